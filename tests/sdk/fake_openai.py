"""A fake OpenAI-compatible upstream for the SDK test and the browser journey: answers
/v1/chat/completions, streamed or not, with "echo: <last message>"; with "recall: <first user
message>" when the last message contains "RECALL" (proves the history arrived); fails with 500
when it contains "FAIL" (to exercise the rules), and with 503 when it contains "FALLBACK" unless
the request is for the model "sdk-backup" (to exercise the fallback model).
FAKE_OPENAI_CHUNK_DELAY_MS spaces the streamed chunks out, so a client can watch an answer
grow."""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


CHUNK_DELAY_S = int(os.environ.get("FAKE_OPENAI_CHUNK_DELAY_MS", "0")) / 1000


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        if self.headers.get("authorization") != "Bearer sk-fake-upstream":
            return self.send_json(401, {"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}})
        last = request["messages"][-1]["content"]
        if "FAIL" in last:
            return self.send_json(500, {"error": {"message": "boom", "type": "server_error", "code": None}})
        if "FALLBACK" in last and request.get("model") != "sdk-backup":
            return self.send_json(503, {"error": {"message": "The engine is currently overloaded", "type": "server_error", "code": None}})
        answer = f"echo: {last}"
        if "RECALL" in last:
            first = next(m["content"] for m in request["messages"] if m["role"] == "user")
            answer = f"recall: {first}"
        if not request.get("stream"):
            return self.send_json(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": request["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            })
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        def chunk(payload):
            data = f"data: {payload}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": request["model"]}
        chunk(json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
        for word in answer.split(" "):
            time.sleep(CHUNK_DELAY_S)
            chunk(json.dumps({**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}))
        chunk(json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        chunk(json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}))
        chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
