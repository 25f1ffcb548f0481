"""Running the app under uvicorn for `scratchlm serve`: the URL printed once listening, and a signal
(Ctrl-C, SIGTERM) that first ends every stream in flight with a final chunk, then stops the server."""

from __future__ import annotations

import signal
import sys

import uvicorn

from .app import create_app


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler, model_id: str, parallel: int):
        super().__init__(config)
        self.scheduler, self.model_id, self.parallel = scheduler, model_id, parallel

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.should_exit:  # could not bind: uvicorn has said why
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        print(f"scratchlm serve: http://{host}:{port} (model {self.model_id}, {self.parallel} parallel); "
              "Ctrl-C stops", flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        # the scheduler ends each running sequence with finish_reason "abort" at its next step, so the
        # streams close themselves and uvicorn's wait for open connections ends. Unlike uvicorn's own
        # handler the signal is not raised again once stopped: a clean stop exits 0, with no traceback.
        self.scheduler.shutdown()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        self.should_exit = True


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, parallel: int = 8,
          queue_size: int = 64, ctx: int | None = None, model_id: str | None = None) -> int:
    app = create_app(model, model_id=model_id, api_key=api_key, parallel=parallel, queue_size=queue_size, ctx=ctx)
    state = app.state.serve
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = _Server(config, state.scheduler, state.model_id, parallel)
    server.run()
    if not server.started:
        print(f"scratchlm: error: could not listen on {host}:{port}", file=sys.stderr)
        return 1
    return 0
