"""Attribution: the process, container or pod, and GPU behind each flow (docs/attribution.md).

``sockdiag`` (the flow's socket), ``proc`` (its process), ``cgroup`` (container, pod, unit),
``gpu`` (NVIDIA devices held), ``netns`` (pods' own network namespaces), ``ctevents``
(connections as conntrack announces them), ``respond`` (freeze / kill), ``service`` (the
worker and its caches) and ``sink`` (between the engine's events and the log). Nothing here
is on the verdict path but one sock_diag round trip for dropped flows.
"""
