"""MPTCP endpoints: one interface, several implementations (for now the local Linux kernel)."""
