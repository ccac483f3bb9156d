"""TextFrame's prebuilt websocket frames, read back by an independent parser (websockets')."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from orchestrator_ws.realtime.transport import TextFrame


def parse(wire: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_wire_is_one_unmasked_final_text_frame(size):
    text = ("é" * size)[:size] if size < 10 else "x" * (size - 2) + "é"
    frame = TextFrame(text)
    parsed = parse(frame.wire)
    assert parsed.opcode is Opcode.TEXT and parsed.fin
    assert parsed.data.decode() == text
    assert frame.wire is frame.wire  # built once


def test_of_shares_one_frame_per_message():
    message = {"type": "group.frame", "text": '{"seq":1}'}
    assert TextFrame.of(message) is TextFrame.of(message)
    assert TextFrame.of(message).text == '{"seq":1}'
