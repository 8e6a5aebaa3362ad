"""egressd policies: YAML that security teams edit -> a compiled judge for flows.

The engine calls :meth:`Policy.judge` with the :class:`FlowFacts` of a new flow and again
whenever a detector reports something; the first rule that matches decides, otherwise the
policy default does. ``egressd validate`` calls :func:`validate`, which reports every problem
in a file (and its includes) at once, each as ``file:line:col: sentence``.

Policy file format
==================

::

    mode: enforce            # enforce | monitor (monitor: record what would be dropped, drop nothing)
    default: accept          # required: accept | drop | alert, for flows no rule matches
    fail: open               # open | closed: what the kernel does when no daemon listens
    on_overload: drop        # accept | drop: flow table full and nothing idle to evict
    on_error: accept         # accept | drop: a packet the engine cannot decode (that packet only)
    include: [lists/mining-pools.yaml, lists/tunnel-services.yaml]  # relative to this file
    settings:                # all optional
      pool_domains: mining_pool_domains  # the domain list behind the mining.pool-domain detection
      tunnel_service_domains: tunnel_service_domains  # ... behind tunnel.service-domain
      head_bytes: 8192       # bytes per direction kept for detectors (64 .. 1 MiB)
      max_packets: 32        # packets per direction before the verdict is pinned (1 .. 10000)
      max_flows: 65536       # flow table size (16 .. 16M)
      tcp_idle: 300          # seconds (1 .. 86400)
      udp_idle: 60           # seconds (1 .. 86400)
      dns_cache: 65536       # address -> name cache entries (0 .. 16M)
      queue_num: 0           # NFQUEUE number (0 .. 65535)
      queue_len: 4096        # NFQUEUE length (1 .. 1M)
    lists:
      ssh_allowed:       {type: cidr,   items: [203.0.113.10/32, "2001:db8:1::/48"]}
      ssh_allowed_names: {type: domain, items: [git.example.org, "*.corp.example"]}
      pool_ports:        {type: port,   items: [3333, 4444, 14444-14446]}
    rules:
      - name: drop-mining
        description: Stratum and relatives on any port
        match: {detection: mining}
        action: drop          # accept | drop | alert (alert = accept and record)

Lists
  ``type`` is ``cidr`` (addresses and networks, IPv4 and IPv6; host bits must be zero),
  ``port`` (numbers 0-65535 and ranges ``first-last``) or ``domain`` (exact names and
  ``"*.suffix"``; a wildcard matches names *below* the suffix, so ``*.x.com`` matches
  ``a.x.com`` and ``a.b.x.com`` but neither ``x.com`` nor ``evilx.com`` — list both forms
  when you mean both). Names are compared case-insensitively; quote a value that starts
  with ``*`` (YAML reads ``*x`` as an alias). ``description`` is optional. List names are
  global across all included files and must be unique; a list may not contain another list.
  An empty ``items`` is allowed (an operator emptying an allowlist on purpose).

Match conditions (all present conditions must hold; a list of values matches any of them)
  ``proto``       tcp, udp, icmp, icmpv6, sctp, gre, esp, ah, dccp, udplite, any, or a number 0-255
  ``src``/``dst`` address, CIDR, ``$cidr_list``, or a list of those
  ``src_port``/``dst_port``  port, ``"a-b"``, ``$port_list``, or a list of those; a port
                  condition only matches protocols that have ports (tcp, udp, sctp, dccp, udplite)
  ``dst_domain``  name, ``"*.suffix"``, ``$domain_list``, or a list; holds when any name the engine
                  tied to the flow (DNS answer for the destination, TLS SNI, CONNECT host) matches
  ``detection``   a detection kind or a dotted prefix of one (``mining`` matches ``mining.xmr``);
                  the known kinds are the constants of :mod:`egressd.detect.base`
  ``not``         a match block that must not hold, or a list of blocks none of which may hold:
                  ``not: [{dst: $ssh_allowed}, {dst_domain: $ssh_allowed_names}]`` reads "unless the
                  destination is an allowed address or an allowed name"

Who is behind the flow (:mod:`egressd.policy.who`; judged after attribution, never for a verdict)
  ``process``     ``{name, executable, user, uid}``: globs on the name and executable, user names,
                  uids or ``"first-last"`` ranges
  ``container``   ``any``, ``none`` or container ids (12+ hex digits: a prefix of the id)
  ``pod``         Kubernetes pod UIDs;  ``cgroup``  globs on the cgroup-v2 path;  ``gpu``  true | false
  A rule with any of these must have ``action: alert``; it may add ``severity: 1|2|3`` and
  ``respond: freeze|kill`` (``respond`` is also allowed on drop rules).

A rule without ``match`` (or with an empty one) matches every flow; rules after it could
never match and are reported. Rules from included files come before the including file's own
rules (depth first, in ``include`` order); a file included twice is read once. An included
file may hold ``include``, ``lists`` and ``rules`` only. A file holding only ``lists`` is a
list file: :func:`validate` checks it on its own, :func:`load_policy` refuses it (no default).

Layers (see :mod:`egressd.policy.layers`): a main file may ``extends: FILE`` (or
``egressd:default``) to build on a base policy, ``append:`` items to a list read before it,
``override:`` a rule's ``action``/``description``/``priority``/``enabled``, and give any rule
``priority`` (EVE severity) or ``enabled: false``; ``egressd validate --print-merged`` shows
the result with the ``file:line`` of every list item and rule.

Refused: YAML aliases and anchors (use ``$lists``), tags other than the plain YAML ones,
more than one YAML document per file, nesting deeper than 64 levels, files over 8 MiB.
"""

from egressd.policy.loader import load_policy, load_policy_text, validate
from egressd.policy.matchers import CidrSet, DomainSet, Match, PortSet
from egressd.policy.model import (
    ACTIONS,
    SETTINGS_LIMITS,
    Decision,
    Diagnostic,
    FlowFacts,
    Policy,
    PolicyError,
    Rule,
    Settings,
)
from egressd.policy.values import KNOWN_KINDS

__all__ = [
    "ACTIONS",
    "KNOWN_KINDS",
    "SETTINGS_LIMITS",
    "CidrSet",
    "Decision",
    "Diagnostic",
    "DomainSet",
    "FlowFacts",
    "Match",
    "Policy",
    "PolicyError",
    "PortSet",
    "Rule",
    "Settings",
    "load_policy",
    "load_policy_text",
    "validate",
]
