"""Streaming video question answering: a ReKV memory on the one cache manager.

    qa = VideoQA.from_pretrained("path/to/video-llm", memory_dir="mem/", window_frames=8)
    qa = VideoQA.from_pretrained()       # the embedded tiny model (assets/tiny-vqa)
    qa.feed(frame, timestamp=t)          # any time; one KV block per frame
    answer = qa.ask("what color was the first shape?")   # Answer(text, timestamps, latency_s)
    qa.close()                           # a later process reopens mem/ and keeps answering

Modules: `video_qa` (the public API and the per-step loop), `memory` (frame blocks and
their index on the `CacheManager`, persistence), `retrieval` (ReKV scoring and selection),
`context` (the transformers `Cache` and projection hooks the runtime attaches through),
`inputs` (checks of frames and questions, with messages that say what to fix).
Model adapters live in `streamrt.models.vlm`.
"""

from streamrt.qa.memory import FrameRecord, QAMemory
from streamrt.qa.video_qa import Answer, VideoQA

__all__ = ["Answer", "FrameRecord", "QAMemory", "VideoQA"]
