"""Streaming video QA (ReKV on the cache manager) with tiny random stock transformers models.

These pin mechanics, not answer quality: exact logits against the stock forward, a needle
fetched back from disk, bit-exact tier moves and restarts, and clear errors on bad input.
"""

from __future__ import annotations

import errno
import os
import threading
import warnings

import pytest
import torch
import transformers

from streamrt.cache import DISK, DiskTierError
from streamrt.cache import disk_store as disk_store_module
from streamrt.models.vlm_tiny import IMAGE_SIZE, save_tiny_vlm
from streamrt.qa import VideoQA
from streamrt.world import make_clip

FAMILIES = ("smolvlm", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
BLOCK = 2 * 2 * 4 * 2 * 8 * 4  # bytes of one frame block of the tiny models (2 layers, 4 tokens)
SYSTEM = "system what color is the circle"  # 7 words: a sink of 2 blocks, the last partial


pytestmark = pytest.mark.usefixtures("one_thread_quiet")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {fam: save_tiny_vlm(root / fam, fam) for fam in FAMILIES}


def clip_frames(n: int, seed: int = 0) -> torch.Tensor:
    """World frames at the tiny models' size, uint8 `[n, 32, 32, 3]`."""
    frames = make_clip(seed, n).frames[:, :: 64 // IMAGE_SIZE, :: 64 // IMAGE_SIZE]
    return torch.as_tensor(frames.copy())


def open_qa(path, memory_dir=None, **kw) -> VideoQA:
    """A session with budgets in blocks: 32 on the device, 4 on the host (`kw` overrides)."""
    block = BLOCK * (16 if path.name.startswith("qwen2") else 1)  # 64 tokens per Qwen2-VL frame
    opts = {
        "system_prompt": SYSTEM,
        "window_frames": 3,
        "retrieve_frames": 2,
        "device_bytes": 32 * block,
        "host_bytes": 4 * block,
        **{k: v * block // BLOCK if k.endswith("_bytes") else v for k, v in kw.items()},
    }
    return VideoQA.from_pretrained(path, memory_dir, **opts)


def feed_and_snapshot(qa: VideoQA, frames: torch.Tensor) -> dict[int, torch.Tensor]:
    """Feed frames one by one; copy each frame's block right after it was written."""
    snaps = {}
    for f in frames:
        qa.feed(f)
        index = qa.memory.seq.next_index - 1
        snaps[index] = qa.memory.seq.kv(index, writable=False).clone()
    return snaps


def assert_blocks_equal(qa: VideoQA, snaps: dict[int, torch.Tensor]) -> None:
    for index, expected in snaps.items():
        moved, _ = qa.memory.fetch([index])
        assert torch.equal(qa.memory.seq.kv(index, writable=False), expected), index
        qa.memory.release(moved)


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_stock_forward_over_full_sequence(model_dirs, family):
    # Window and retrieval cover every frame: the streamed memory must reproduce the stock
    # model's forward over [system | frames | question] (float32, atol 1e-5).
    qa = open_qa(model_dirs[family], window_frames=64, retrieve_frames=64, host_bytes=64 * BLOCK)
    frames = clip_frames(6)
    qa.feed(frames[:2])
    qa.feed(frames[2:])
    question = "what color was the square ?"
    got = qa.question_logits(question)

    a, model = qa.adapter, qa.adapter.model
    sys_ids, q_ids = qa._tokenize(SYSTEM), qa._tokenize(question)
    pixels = a.pixels(frames.float() / 255)
    with torch.no_grad():
        if family == "smolvlm":  # the stock multimodal path: image tokens + pixel values
            n_img = a.tokens_per_frame * len(frames)
            ids = sys_ids + [model.config.image_token_id] * n_img + q_ids
            ref = model(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).logits[0]
        elif family.startswith("qwen2"):  # M-RoPE positions by the model's own rule, per frame
            m, cur = model.model, len(sys_ids)
            pos = [torch.arange(len(sys_ids)).expand(3, -1)]
            for _ in frames:
                pos.append(m.get_vision_position_ids(cur, a._grid(), 1, 2))
                cur += a.FRAME_GRID
            pos.append(torch.arange(len(q_ids)).expand(3, -1) + cur)
            embeds = torch.cat([a.embed_text(sys_ids), a.encode_frames(pixels).flatten(0, 1)])
            embeds = torch.cat([embeds, a.embed_text(q_ids)])
            ref = model(inputs_embeds=embeds[None], position_ids=torch.cat(pos, 1)[:, None]).logits[
                0
            ]
        else:  # stock video features, per frame (a live stream has no clip-final newline)
            video = model.model.get_video_features(
                pixels[None],
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
                return_dict=True,
            ).pooler_output[0, :-1]
            embeds = torch.cat([a.embed_text(sys_ids), video, a.embed_text(q_ids)])
            ref = model(inputs_embeds=embeds[None]).logits[0]
    ref = ref[-len(q_ids) :]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    answer = qa.ask(question, max_new_tokens=3)
    assert answer.timestamps == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    assert answer.token_ids[0] == int(ref[-1].argmax())
    qa.manager.check_invariants()
    qa.close()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_frames_match_the_stock_processor_and_get_rope_index(model_dirs, family):
    # One frame between text: the stock multimodal forward (its image processor layout,
    # its get_rope_index M-RoPE positions) must equal the streamed memory.
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from streamrt.models.vlm import _qwen_patchify

    qa = open_qa(model_dirs[family], window_frames=8, retrieve_frames=8)
    a, model = qa.adapter, qa.adapter.model
    frame = clip_frames(1)[0]
    proc = Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, do_resize=False
    )
    stock = proc(images=[frame.numpy()], return_tensors="pt")
    mine = _qwen_patchify(a.pixels(frame[None].float() / 255), 2, 2, 2)
    torch.testing.assert_close(mine, stock["pixel_values"], atol=1e-6, rtol=0)
    assert stock["image_grid_thw"].tolist() == [a._grid().tolist()]

    qa.feed(frame)
    question = "what color was the circle ?"
    sys_ids, q_ids = qa._tokenize(SYSTEM), qa._tokenize(question)
    n = a.tokens_per_frame
    ids = torch.tensor([sys_ids + [model.config.image_token_id] * n + q_ids])
    types = torch.tensor([[0] * len(sys_ids) + [1] * n + [0] * len(q_ids)])
    with torch.no_grad():
        ref = model(
            input_ids=ids,
            pixel_values=stock["pixel_values"],
            image_grid_thw=stock["image_grid_thw"],
            mm_token_type_ids=types,
        ).logits[0, -len(q_ids) :]
    torch.testing.assert_close(qa.question_logits(question), ref, atol=1e-5, rtol=0)
    assert a.frame_positions().max(0).values.tolist() == [0, 7, 7]  # (t, row, col) offsets


WRAPPERS = {  # added in this order, so Qwen's ids land on its config's vision_start/end ids
    "smolvlm": ["<fake_token_around_image>", "<global-img>"],
    "qwen2_vl": ["<|vision_end|>", "<|vision_start|>"],
}


@pytest.mark.parametrize("family", sorted(WRAPPERS))
def test_frame_blocks_carry_the_processors_wrapper_tokens(model_dirs, family, tmp_path):
    # A tokenizer that knows the family's per-image tokens (as real checkpoints' do): each
    # frame block is wrapper + visual tokens, and the streamed memory equals the stock
    # forward over the processor's layout (SmolVLM: <fake><global-img> <image>*T <fake>;
    # Qwen2-VL: <|vision_start|> <|image_pad|>*T <|vision_end|>, M-RoPE by get_rope_index).
    import shutil

    from transformers import AutoTokenizer

    path = shutil.copytree(model_dirs[family], tmp_path / family)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": WRAPPERS[family]})
    tok.save_pretrained(path)
    qa = open_qa(path, window_frames=64, retrieve_frames=64, host_bytes=64 * BLOCK)
    a, model = qa.adapter, qa.adapter.model
    before = [tok.convert_tokens_to_ids(t) for t in a.frame_wrapper[0]]
    after = [tok.convert_tokens_to_ids(t) for t in a.frame_wrapper[1]]
    assert (a.frame_prefix, a.frame_suffix) == (tuple(before), tuple(after))
    assert a.tokens_per_frame == len(before) + a.visual_tokens + len(after)
    frames = clip_frames(3)
    qa.feed(frames)
    question = "what color was the square ?"
    sys_ids, q_ids = qa._tokenize(SYSTEM), qa._tokenize(question)
    block = before + [model.config.image_token_id] * a.visual_tokens + after
    ids = torch.tensor([sys_ids + block * len(frames) + q_ids])
    pixels = a.pixels(frames.float() / 255)
    with torch.no_grad():
        if family == "smolvlm":
            ref = model(input_ids=ids, pixel_values=pixels[None]).logits[0]
        else:
            from streamrt.models.vlm import _qwen_patchify

            types = (ids == model.config.image_token_id).long()
            ref = model(
                input_ids=ids,
                pixel_values=_qwen_patchify(pixels, 2, 2, 2),
                image_grid_thw=a._grid().repeat(len(frames), 1),
                mm_token_type_ids=types,
            ).logits[0]
    torch.testing.assert_close(qa.question_logits(question), ref[-len(q_ids) :], atol=1e-5, rtol=0)
    qa.close()


def test_tier_moves_are_bit_exact_and_do_not_change_answers(model_dirs, tmp_path):
    # Same frames, same window: one session keeps every frame on the host, the other pushes
    # them through device -> host -> disk. Blocks and answer logits must be identical.
    frames = clip_frames(12)
    roomy = open_qa(model_dirs["smolvlm"], host_bytes=64 * BLOCK, retrieve_frames=4)
    tight = open_qa(model_dirs["smolvlm"], tmp_path / "mem", retrieve_frames=4)
    snaps_roomy = feed_and_snapshot(roomy, frames)
    snaps_tight = feed_and_snapshot(tight, frames)
    assert tight.memory.tier_counts() == {"device": 2 + 3, "host": 4, "disk": 12 - 3 - 4 + 0}
    assert roomy.memory.tier_counts()[DISK] == 0
    for index in snaps_roomy:
        assert torch.equal(snaps_roomy[index], snaps_tight[index])
    assert_blocks_equal(tight, snaps_tight)
    question = "what shape moved left ?"
    assert torch.equal(roomy.question_logits(question), tight.question_logits(question))
    assert tight.stats()["cache"]["counters"]["offloads_to_disk"] >= 5
    for qa in (roomy, tight):
        qa.manager.check_invariants()
        qa.close()


def craft_needle(qa: VideoQA, needle: torch.Tensor, others: torch.Tensor) -> None:
    """Make layer 0 score frames by their visual embedding along (needle - mean of others)
    and give the word "needle" the needle's embedding: a random model with a known answer."""
    a = qa.adapter
    attn = a.attention_modules()[0]
    with torch.no_grad():
        emb = a.encode_frames(a.pixels(needle[None].float() / 255))[0].mean(0)
        direction = emb - a.encode_frames(a.pixels(others.float() / 255)).mean((0, 1))
        direction /= direction.norm()
        for proj in (attn.k_proj, attn.q_proj):
            proj.weight.copy_(direction.expand_as(proj.weight))
            if proj.bias is not None:
                proj.bias.zero_()
        a.language_model.layers[0].input_layernorm.weight.fill_(1.0)
        word = qa.tokenizer.convert_tokens_to_ids("needle")
        a.language_model.get_input_embeddings().weight[word] = emb


@pytest.mark.parametrize("retrieval", ["internal", "external"])
def test_needle_far_outside_the_window_is_retrieved_from_disk(model_dirs, tmp_path, retrieval):
    qa = open_qa(model_dirs["llava_onevision"], tmp_path, retrieve_frames=1, retrieval=retrieval)
    frames = clip_frames(24, seed=1)
    needle = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    needle[..., 0] = 255
    frames[3] = needle
    craft_needle(qa, needle, frames[torch.arange(24) != 3])
    qa.feed(frames, timestamp=100.0)
    needle_block = qa.memory.num_sink + 3
    assert qa.memory.seq.table[needle_block].tier == DISK  # 20 frames later, 3-frame window

    answer = qa.ask("needle", max_new_tokens=2)
    assert 103.0 in answer.timestamps
    assert len(answer.timestamps) <= qa.adapter.num_layers  # one frame per layer
    assert qa.memory.seq.table[needle_block].tier != "device"  # put back after the answer
    assert qa.stats()["cache"]["counters"]["fetchs_to_device"] >= 1
    qa.manager.check_invariants()
    qa.close()


# ---------------------------------------------------------------------- persistence


def test_restart_serves_exactly_the_blocks_written_before(model_dirs, tmp_path):
    frames = clip_frames(10)
    qa = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=3)
    snaps = feed_and_snapshot(qa, frames)
    question = "what color was the circle ?"
    before_logits = qa.question_logits(question)
    before = qa.ask(question, max_new_tokens=4)
    qa.close()
    assert (tmp_path / "default.index.pt").is_file()

    again = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=3)  # a fresh manager
    assert sorted(again.memory.records) == sorted(snaps)
    assert again.stats()["frames"] == 10
    assert_blocks_equal(again, snaps)
    assert torch.equal(again.question_logits(question), before_logits)
    after = again.ask(question, max_new_tokens=4)
    assert (after.text, after.timestamps) == (before.text, before.timestamps)
    again.feed(frames[0])  # the stream goes on where it stopped
    assert again.memory.records[max(again.memory.records)].timestamp == 10.0
    again.manager.check_invariants()
    again.close()


def test_corrupt_block_is_skipped_counted_and_never_served(model_dirs, tmp_path):
    qa = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    qa.feed(clip_frames(8))
    qa.close()
    victim = qa.memory.num_sink + 1  # frame at t = 1.0
    path = tmp_path / "blocks" / f"qa.default.{victim}.kv"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped payload byte: the header still checks out
    path.write_bytes(bytes(data))

    again = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    with (
        pytest.warns(RuntimeWarning, match="is corrupt"),
        pytest.warns(UserWarning, match="skipped corrupt frame"),
    ):
        answer = again.ask("what color ?", max_new_tokens=2)
    assert 1.0 not in answer.timestamps
    assert answer.timestamps == (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    stats = again.stats()
    assert stats["corrupt_skipped"] == 1 and stats["frames"] == 7
    assert victim not in again.memory.seq.table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert again.ask("what color ?", max_new_tokens=2).timestamps == answer.timestamps
    again.manager.check_invariants()
    again.close()


# ---------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors_and_the_memory_keeps_answering(model_dirs):
    qa = open_qa(model_dirs["smolvlm"], retrieve_frames=64)
    with pytest.raises(ValueError, match="no frames have been fed"):
        qa.ask("what color ?")
    good = clip_frames(3)
    qa.feed(good)
    bad = {
        "RGB": torch.zeros(32, 32, dtype=torch.uint8),
        "dtype": torch.zeros(32, 32, 3, dtype=torch.int32),
        "NaN": torch.full((32, 32, 3), float("nan")),
        r"\[0, 1\]": torch.full((32, 32, 3), 2.0),
    }
    for message, frame in bad.items():
        with pytest.raises(ValueError, match=message):
            qa.feed(frame)
    with pytest.raises(ValueError, match="timestamps"):
        qa.feed(good[0], timestamp=float("nan"))
    for question in ("", "   ", None):
        with pytest.raises(ValueError, match="non-empty"):
            qa.ask(question)
    with pytest.raises(ValueError, match="max_new_tokens"):
        qa.ask("what ?", max_new_tokens=0)
    qa.manager.check_invariants()
    assert qa.stats()["frames"] == 3
    qa.feed(good[0])
    assert qa.ask("what color ?", max_new_tokens=2).timestamps == (0.0, 1.0, 2.0, 3.0)
    strict = open_qa(model_dirs["smolvlm"], resize=False)
    with pytest.raises(ValueError, match="model takes 32x32"):
        strict.feed(torch.zeros(16, 16, 3, dtype=torch.uint8))
    assert strict.stats()["frames"] == 0
    qa.close()
    with pytest.raises(RuntimeError, match="closed"):
        qa.feed(good[0])


def test_unwritable_memory_dir_and_unknown_options(model_dirs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DiskTierError, match="not a writable directory"):
        open_qa(model_dirs["smolvlm"], blocker / "mem")
    with pytest.raises(ValueError, match="unknown QA option"):
        VideoQA.from_pretrained(model_dirs["smolvlm"], window=3)
    other = tmp_path / "llama"
    transformers.LlamaConfig().save_pretrained(other)
    with pytest.raises(ValueError, match="no streaming QA adapter for model_type 'llama'"):
        VideoQA.from_pretrained(other)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        VideoQA.from_pretrained(tmp_path)


def test_full_disk_drops_with_warning_and_keeps_answering(model_dirs, tmp_path, monkeypatch):
    qa = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    frames = clip_frames(14)
    qa.feed(frames[:8])  # 1 frame on disk so far

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_store_module, "_write_all", disk_full)
    with pytest.warns(UserWarning, match="offload of .* to disk failed"):
        qa.feed(frames[8:])
    counters = qa.stats()["cache"]["counters"]
    assert counters["offload_failures"] == 6 and counters["dropped"] == 6
    qa.manager.check_invariants()
    answer = qa.ask("what color ?", max_new_tokens=2)
    assert answer.timestamps == (0.0, *map(float, range(7, 14)))  # dropped frames are gone
    monkeypatch.undo()
    qa.close()
    again = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    assert again.ask("what color ?", max_new_tokens=2).timestamps == answer.timestamps
    again.manager.check_invariants()
    again.close()


# ---------------------------------------------------------------------- concurrency, turns


def test_ask_from_another_thread_uses_frames_fed_before_it(model_dirs):
    qa = open_qa(model_dirs["smolvlm"], host_bytes=64 * BLOCK, retrieve_frames=64)
    frames = clip_frames(16)
    qa.feed(frames[:4])
    done = threading.Event()
    answers = []

    def feeder():
        for f in frames[4:]:
            qa.feed(f)
        done.set()

    thread = threading.Thread(target=feeder)
    thread.start()
    while not done.is_set():
        fed_before = qa._committed_below - qa.memory.num_sink
        answer = qa.ask("what color ?", max_new_tokens=1)
        answers.append(answer)
        assert len(answer.timestamps) >= fed_before
        assert max(answer.timestamps) < len(frames)
    thread.join()
    assert qa.ask("what color ?", max_new_tokens=1).timestamps == tuple(map(float, range(16)))
    assert answers
    qa.manager.check_invariants()


def test_multi_turn_questions_never_reencode_frames(model_dirs, monkeypatch):
    qa = open_qa(model_dirs["llava_onevision"], host_bytes=64 * BLOCK)
    qa.feed(clip_frames(6))
    calls = []
    vision = qa.adapter.model.model.vision_tower
    handle = vision.register_forward_hook(lambda *a: calls.append(1))
    first = qa.ask("what color ?", max_new_tokens=3)
    second = qa.ask("what shape ?", max_new_tokens=3)
    handle.remove()
    assert calls == []
    assert qa.stats()["questions"] == 2
    assert first.latency_s > 0 and second.latency_s > 0
    assert qa.memory.tier_counts()["device"] == 2 + 3  # retrieved blocks went back down
    qa.manager.check_invariants()


def test_save_without_close_keeps_every_frame_after_a_crash(model_dirs, tmp_path):
    qa = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    snaps = feed_and_snapshot(qa, clip_frames(10))
    tiers = {i: b.tier for i, b in qa.memory.seq.items()}
    qa.save()  # then the process "dies": no close
    assert {i: b.tier for i, b in qa.memory.seq.items()} == tiers  # frames stayed put
    assert sum(t == DISK for t in tiers.values()) == 10 + 2 - 2 - 3 - 4  # only 1 was on disk
    writes = qa.manager.disk.stats()["writes"]
    qa.save()  # a second save writes only the index: clean copies are kept
    assert qa.manager.disk.stats()["writes"] == writes
    qa.manager.disk = None  # the dead process writes nothing more

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = open_qa(model_dirs["smolvlm"], tmp_path, retrieve_frames=64)
    assert sorted(again.memory.records) == sorted(snaps)
    assert again.stats()["missing_on_restore"] == 0
    assert_blocks_equal(again, snaps)
    assert again.ask("what color ?", max_new_tokens=1).timestamps == tuple(map(float, range(10)))
    again.manager.check_invariants()
    again.close()


# ---------------------------------------------------------------------- retrieval rules


def test_selection_rules_are_exact():
    from streamrt.qa import retrieval

    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0, 0.7], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert retrieval.select(scores, k=3) == [[1, 3, 5], [0, 1, 2]]  # top-k, time order
    assert retrieval.select(scores, k=10) == [list(range(6))] * 2  # fewer frames than k
    # groups of 2: means [0.5, 0.5, 0.35] -> ties keep the earlier group; k=3 cuts group 1
    assert retrieval.select(scores[:1], k=3, group=2) == [[0, 1, 2]]
    assert retrieval.select(scores[1:], k=4, group=4) == [[0, 1, 2, 3]]

    # consensus: frame 1 has two votes; among the one-vote frames 4 stands out most in its
    # layer (z 1.6 against 1.3 for frame 0)
    layers = torch.tensor([[9.0, 8.0, 0, 0, 0], [0, 9.0, 8.0, 0, 0], [0, 0, 0, 8.0, 12.0]])
    assert retrieval.select(retrieval.consensus(layers, k=2), k=2) == [[1, 4]]
    big = layers * torch.tensor([[1.0], [1.0], [1000.0]])  # scale-free: same choice
    assert retrieval.select(retrieval.consensus(big, k=2), k=2) == [[1, 4]]
    assert retrieval.select(big.sum(0, keepdim=True), k=2) == [[3, 4]]  # summed: one layer rules
    assert retrieval.consensus(layers, k=2).shape == (1, 5)

    # GQA: 4 query heads over 2 KV heads (D=2); each KV head gets its group's mean query.
    q = torch.tensor([[[1.0, 0, 3, 0, 0, 2, 0, 4], [3.0, 0, 1, 0, 0, 0, 0, 0]]])  # [1, n=2, 8]
    vec = retrieval.question_vectors([q], num_kv_heads=2, head_dim=2)
    assert vec.tolist() == [[2.0, 0.0, 0.0, 1.5]]
    summaries = torch.tensor([[[1.0, 0, 0, 0]], [[0.0, 0, 0, 1]]])  # [N=2, L=1, 4]
    assert retrieval.internal_scores(vec, summaries).tolist() == [[2.0, 1.5]]


def test_shared_manager_without_disk_refuses_a_memory_dir(model_dirs, tmp_path):
    from streamrt.cache import CacheManager

    shared = CacheManager(device_bytes=64 * BLOCK, host_bytes=8 * BLOCK)
    with pytest.raises(ValueError, match="needs a disk tier"):
        VideoQA.from_pretrained(model_dirs["smolvlm"], tmp_path, manager=shared)
    qa = VideoQA.from_pretrained(model_dirs["smolvlm"], manager=shared, window_frames=2)
    qa.feed(clip_frames(4))
    assert shared.stats()["consumers"]["qa"]["host"]["blocks"] == 2
    qa.close()
    shared.check_invariants()
    assert shared.stats()["sequences"] == 0
