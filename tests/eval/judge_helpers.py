"""Shared by the fake OpenAI-compatible judge servers of the judge tests."""


def send_reply(handler, payload: bytes) -> None:
    """Write a 200 JSON (or deliberately broken) reply; a client that already gave up is fine."""
    try:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
    except OSError:  # the client timed out and closed the connection
        pass
