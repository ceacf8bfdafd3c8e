#!/bin/sh
# The image's entrypoint: runs `meshgate "$@"`.
#
# The image's own config (/etc/meshgate/gateway.toml as shipped) proxies to the
# bundled demo upstream on 127.0.0.1:9001, so `docker run -p 8080:8080 meshgate`
# answers a first `curl localhost:8080/hello`. Only while that config is served
# unchanged is the demo upstream started beside the gateway; a config of your
# own (mounted over it, or named with -c) starts nothing else.
set -eu
if [ "$*" = "run -c /etc/meshgate/gateway.toml" ] \
  && cmp -s /etc/meshgate/gateway.toml /usr/share/meshgate/gateway.toml; then
  /usr/local/bin/meshgate demo-upstream --listen 127.0.0.1:9001 &
fi
exec /usr/local/bin/meshgate "$@"
