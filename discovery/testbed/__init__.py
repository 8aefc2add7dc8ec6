"""A multi-site testbed on one machine: nodes in network namespaces, sites joined by a router namespace.

`plan` (addresses, names, routing rules, what a spec means: no I/O), `relay` (the router's userspace delay of
inter-site packets), `net` (runs `ip`/`tc`, enters namespaces, probes links) and `bed` (the life cycle behind
`discovery testbed`).
"""
