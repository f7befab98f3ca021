#!/bin/sh
# Give the kernel a second address (the next one up from its own) and announce it: an
# `ip mptcp endpoint ... signal`, which makes the kernel send ADD_ADDR once a connection is up.
# $1: "port N" to announce it with a port.
case "$OPT_IP_VERSION" in
ipv6) second="${OPT_LOCAL_IP%::*}::1"; plen=48 ;;
*) second="${OPT_LOCAL_IP%.*}.$(( ${OPT_LOCAL_IP##*.} + 1 ))"; plen=16 ;;
esac
ip addr add "$second/$plen" dev "$OPT_LOCAL_DEV" nodad 2>/dev/null || ip addr add "$second/$plen" dev "$OPT_LOCAL_DEV"
ip mptcp endpoint add "$second" $1 id 1 signal
