"""ReKV retrieval: score stored frames for a question, pick the top ones per layer.

    internal (ReKV):  q_bar[l] = mean over question tokens of the pre-RoPE queries of
                      layer l, query heads averaged within each KV-head group -> [H_kv * D];
                      score[l, i] = q_bar[l] . k_bar[l, i]   (k_bar: the block's summary key)
    external:         score[i] = cos(mean question token embedding, mean visual embedding
                      of frame i), the same for every layer

Per-layer scores, one selection (`consensus`, the default): every layer nominates its own
top `k` frames, and the frames most layers nominate are chosen for every layer (ties: the
larger maximum over layers of the frame's standardised score). Independent per-layer choices
(ReKV as published) hand each layer a different context; a model trained on one coherent
clip (the embedded tiny model, every layer seeing the same frames at the same positions)
then answers from a context it never saw, and single layers whose scores do not separate
the frames (layer 0's keys do not depend on context: every copy of a background frame
ties) pull in filler. See assets/tiny-vqa/TRAINING.md, "Needles in long streams".

Frames are taken in groups of `group` consecutive frames (a group's score is the mean of
its members'), best groups first, until `k` frames are chosen; the result is in time order,
so the chosen frames are laid at consecutive positions in the order they were seen.
Every layer chooses exactly `k` frames, so all layers attend to contexts of one length.
"""

from __future__ import annotations

import torch


def question_vectors(queries: list[torch.Tensor], num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Per-layer mean pre-RoPE query `[L, H_kv * D]` from `q_proj` outputs `[1, n, H_q * D]`."""
    rows = []
    for q in queries:
        q_bar = q.float().reshape(-1, q.shape[-1]).mean(0)  # [H_q * D]
        rows.append(q_bar.view(num_kv_heads, -1, head_dim).mean(1).flatten())
    return torch.stack(rows)


def internal_scores(q_vectors: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
    """`[L, N]` scores of N frames with summaries `[N, L, H_kv * D]`."""
    return torch.einsum("lc,nlc->ln", q_vectors, summaries.float())


def external_scores(question_embed: torch.Tensor, frame_embeds: torch.Tensor) -> torch.Tensor:
    """`[1, N]` cosine scores of frame embeddings `[N, hidden]` against a question `[hidden]`."""
    q = question_embed.float()[None]
    return torch.nn.functional.cosine_similarity(frame_embeds.float(), q, dim=-1)[None]


def consensus(scores: torch.Tensor, k: int, group: int = 1) -> torch.Tensor:
    """`[1, N]` scores that rank frames by how many layers (rows of `scores` `[L, N]`)
    choose them with `select(scores, k, group)`; ties go to the frame some layer singles out
    most clearly: the larger maximum over layers of its standardised score (scale-free, so
    no layer dominates by magnitude)."""
    scores = scores.float()
    votes = torch.zeros(scores.shape[1])
    for row in select(scores, k, group):
        votes[row] += 1
    std = scores.std(1, keepdim=True, unbiased=False).clamp_min(1e-12)
    z = ((scores - scores.mean(1, keepdim=True)) / std).amax(0)
    # 2 * votes + a number in [0, 1]: the tie-break never outweighs one vote.
    return (2 * votes + torch.sigmoid(z))[None]


def select(scores: torch.Tensor, k: int, group: int = 1) -> list[list[int]]:
    """Per row of `scores` `[L, N]`, the positions (0..N-1, ascending) of the `k` chosen frames."""
    rows, n = scores.shape
    k = min(k, n)
    if k <= 0:
        return [[] for _ in range(rows)]
    group = max(1, group)
    num_groups = -(-n // group)
    pad = num_groups * group - n
    sums = torch.nn.functional.pad(scores.float(), (0, pad)).view(rows, num_groups, group).sum(-1)
    sizes = torch.full((num_groups,), float(group))
    sizes[-1] = group - pad
    # A stable sort keeps earlier groups first on ties: selection is deterministic.
    order = torch.sort(-(sums / sizes), dim=1, stable=True).indices.tolist()
    need = -(-k // group) + 1  # enough groups to cover k frames, whatever the last one's size
    chosen = []
    for row in order:
        picked: list[int] = []
        for g in row[:need]:
            members = range(g * group, min(g * group + group, n))
            picked.extend(members[: k - len(picked)])
            if len(picked) == k:
                break
        chosen.append(sorted(picked))
    return chosen
