#!/usr/bin/env python3
"""A webhook receiver for benches/webhooks/run.sh: `ok` answers 204 at once, `hang` reads
the request and never answers. Listens on 127.0.0.1 (a free port, written to --port-file),
counts the requests in --count-file, and exits by itself after --max-seconds."""

import argparse
import http.server
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ok", "hang"], required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--count-file", required=True)
    ap.add_argument("--max-seconds", type=float, default=300)
    args = ap.parse_args()
    lock = threading.Lock()
    count = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", "0")))
            with lock:
                count[0] += 1
                with open(args.count_file, "w") as f:
                    f.write(str(count[0]))
            if args.mode == "hang":
                time.sleep(args.max_seconds)
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(args.count_file, "w") as f:
        f.write("0")
    with open(args.port_file, "w") as f:
        f.write(str(server.server_address[1]))
    threading.Timer(args.max_seconds, server.shutdown).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
