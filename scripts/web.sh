#!/usr/bin/env bash
# The ASGI server (HTTP and the worklist WebSocket), as `make run` (Procfile) starts it.
# uvicorn hands a request body to the app as it arrives, so ichweb.body_limit answers 413 to an
# oversized upload before the rest of it is sent (daphne, used before, stored a whole body
# first). No access log: a DICOMweb query string can hold a patient's name. Proxy headers are
# left to ichweb's own ICH_TRUSTED_PROXIES handling, not uvicorn's.
# uvicorn's own log says warnings only: at INFO it names each WebSocket's path.
set -euo pipefail
echo "ASGI server (uvicorn) on http://${ICH_HOST:-127.0.0.1}:${ICH_PORT:-8000}"
exec "${PYTHON:-python}" -m uvicorn ichweb.asgi:application \
  --host "${ICH_HOST:-127.0.0.1}" --port "${ICH_PORT:-8000}" \
  --no-access-log --log-level warning --no-proxy-headers --no-server-header --lifespan off \
  --ws websockets-sansio --http h11 "$@"
