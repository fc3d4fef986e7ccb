"""Frame sources and sinks: PyAV files and streams, numpy iterators."""

from streamrt.io.sinks import VideoSink, open_sink

__all__ = ["VideoSink", "open_sink"]
