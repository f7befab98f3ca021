"""Active probing: a scripted MPTCP peer (peer.py) played from a script (script.py) against a
kernel listener in a Lab (run.py)."""
