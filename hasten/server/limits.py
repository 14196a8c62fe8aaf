"""The server's default bounds on one request (a light module: the command line reads it without FastAPI)."""

MAX_GENERATIONS = 64  # prompts x n of one request
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413
KEEPALIVE_S = 15.0  # a waiting stream gets an SSE comment this often
DEFAULT_MAX_BATCH = 8  # generations decoded together by the worker
DEFAULT_MAX_QUEUE = 256  # requests that may wait for room in the batch; more get 503
RETRY_AFTER_S = 5  # the Retry-After header of every 503
