"""The runtime: one engine serving many live streams and QA sessions on one cache manager
(see `streamrt.runtime.runtime`)."""

from streamrt.runtime.live import StreamFailed, StreamHandle
from streamrt.runtime.qa import QAHandle
from streamrt.runtime.runtime import AdmissionError, Runtime

__all__ = ["AdmissionError", "QAHandle", "Runtime", "StreamFailed", "StreamHandle"]
