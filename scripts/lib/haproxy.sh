# deploy/haproxy.cfg rewritten for local servers (sourced by
# scripts/haproxy-smoke.sh and scripts/bench-haproxy.sh).
#
# Usage: haproxy_config LISTEN_PORT PORT1 PORT2 PORT3 >haproxy.cfg
# (the same port three times puts one server behind it).
haproxy_config() { # listen_port port1 port2 port3
    local config
    config=$(sed -e "s/^\( *bind \):8000/\1127.0.0.1:$1/" \
        -e "s/^\( *server nox1 \)[^ ]*/\1127.0.0.1:$2/" \
        -e "s/^\( *server nox2 \)[^ ]*/\1127.0.0.1:$3/" \
        -e "s/^\( *server nox3 \)[^ ]*/\1127.0.0.1:$4/" \
        deploy/haproxy.cfg)
    if ! grep -q "server nox3 127.0.0.1:$4" <<<"$config" || ! grep -q "bind 127.0.0.1:$1" <<<"$config"; then
        echo "deploy/haproxy.cfg: its bind or server lines were not found" >&2
        return 1
    fi
    echo "$config"
}
