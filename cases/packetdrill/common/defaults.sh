#!/bin/sh
# The stage every script of this corpus starts from (packetdrill exports OPT_* to commands):
# plain TCP behaviour fixed, MPTCP on, no pacing qdisc on the script's device.
sysctl -q net.mptcp.enabled=1
sysctl -q net.ipv4.tcp_timestamps=1 net.ipv4.tcp_sack=1 net.ipv4.tcp_dsack=1
sysctl -q net.ipv4.tcp_syn_retries=5 net.ipv4.tcp_synack_retries=5
sysctl -q net.ipv4.tcp_slow_start_after_idle=0 net.ipv4.tcp_early_retrans=4
sysctl -q net.ipv4.tcp_rmem="4096 540000 15728640" net.ipv4.tcp_wmem="4096 262144 4194304"
ip tcp_metrics flush all >/dev/null 2>&1
tc qdisc replace dev "${OPT_LOCAL_DEV:-tun0}" root pfifo limit 1000 2>/dev/null
ip mptcp endpoint flush
ip mptcp limits set add_addr_accepted 8 subflows 8
exit 0
