"""A protocol-faithful fake ComfyUI server for tests (see server.py and facts.py)."""

from tests.fakecomfy.server import FakeComfy, RecordedRequest, SentMessage

__all__ = ["FakeComfy", "RecordedRequest", "SentMessage"]
