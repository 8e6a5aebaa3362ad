"""The policy as the engine sees it: flow facts in, a decision out, nothing else.

This module is the contract between the loader (YAML, diagnostics) and the engine (packets,
flows). The engine builds a :class:`FlowFacts` when a flow starts and again whenever a
detector reports something, and calls :meth:`Policy.judge`. A :class:`Policy` is immutable
once loaded: a SIGHUP reload builds a new one and swaps the reference, so a half-loaded
policy can never judge a packet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from egressd.policy.matchers import (
    CONTENT_CLASSIFIED,
    CONTENT_NONE,
    CONTENT_PENDING,
    CONTENT_UNCLASSIFIED,
    CONTENT_VALUES,
    DomainSet,
    Match,
)

__all__ = [
    "ACTIONS",
    "CONTENT_CLASSIFIED",
    "CONTENT_NONE",
    "CONTENT_PENDING",
    "CONTENT_UNCLASSIFIED",
    "CONTENT_VALUES",
    "ERROR_ACTIONS",
    "FAIL_MODES",
    "MODES",
    "OVERLOAD_ACTIONS",
    "SETTINGS_LIMITS",
    "Decision",
    "Diagnostic",
    "FlowFacts",
    "Policy",
    "PolicyError",
    "Rule",
    "Settings",
]

if TYPE_CHECKING:
    from egressd.events import Event
    from egressd.policy.who import WhoMatch

ACTIONS: Final = ("accept", "drop", "alert")
MODES: Final = ("enforce", "monitor")
FAIL_MODES: Final = ("open", "closed")
OVERLOAD_ACTIONS: Final = ("accept", "drop")
ERROR_ACTIONS: Final = ("accept", "drop")


@dataclass(frozen=True, slots=True)
class FlowFacts:
    """What is known about a flow when it is judged.

    ``domains`` are the names the engine tied to the destination (DNS answer for ``dst``,
    TLS SNI, HTTP CONNECT host), lowercased without the trailing dot. ``detections`` are
    dotted detection kinds (see :mod:`egressd.detect.base`). Both only grow during a flow.
    ``content`` is one of the ``CONTENT_*`` values: PENDING until inspection has ended.
    """

    proto: int
    version: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    domains: tuple[str, ...] = ()
    detections: tuple[str, ...] = ()
    content: str = CONTENT_PENDING


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one flow. ``alert`` means accept and record.

    The policy never rewrites the action for ``mode: monitor``; the engine does, so the
    event can still say what the policy *would* have done.
    """

    action: str
    rule: str
    description: str
    severity: int = 0  # EVE alert.severity set by the rule's ``priority``; 0: by detection kind


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in a policy file, at a 1-based line and column."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class PolicyError(Exception):
    """The policy could not be loaded; ``diagnostics`` holds every problem found, in file order."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("\n".join(str(d) for d in diagnostics))
        self.diagnostics = list(diagnostics)


# (minimum, maximum) accepted for each numeric setting. Why bounds at all: these size
# memory (flows x head bytes) and a typo such as ``head_bytes: 81920000`` must be an error
# in CI, not an OOM on every training node.
SETTINGS_LIMITS: Final[dict[str, tuple[float, float]]] = {
    "head_bytes": (64, 1 << 20),
    "max_packets": (1, 10_000),
    "max_flows": (16, 1 << 24),
    "tcp_idle": (1.0, 86_400.0),
    "udp_idle": (1.0, 86_400.0),
    "dns_cache": (0, 1 << 24),
    "queue_num": (0, 65_535),
    "queue_len": (1, 1 << 20),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Engine and daemon tuning, all optional in YAML (``settings:``).

    ``head_bytes``: bytes of each direction kept for detectors. ``max_packets``: packets per
    direction after which the verdict is pinned without a detection. ``max_flows``: flow
    table cap. ``tcp_idle``/``udp_idle``: idle seconds before a flow is forgotten.
    ``dns_cache``: entries of the address -> name cache. ``queue_num``/``queue_len``: the
    NFQUEUE the daemon binds. ``pool_domains``: name of the domain list the mining
    detectors use for ``mining.pool-domain`` ("" when not configured).
    ``tunnel_service_domains``: the same for ``tunnel.service-domain`` (tunnel and
    expose-a-port services: ngrok, cloudflared, localtunnel, ...).
    """

    head_bytes: int = 8192
    max_packets: int = 32
    max_flows: int = 65536
    tcp_idle: float = 300.0
    udp_idle: float = 60.0
    dns_cache: int = 65536
    queue_num: int = 0
    queue_len: int = 4096
    pool_domains: str = ""
    tunnel_service_domains: str = ""


# Settings that name a domain list: a name that matches one is a detection of its own kind
# (engine ``_add_domain``), whichever way the flow brought the name (DNS, SNI, CONNECT host).
DOMAIN_SETTINGS: Final = ("pool_domains", "tunnel_service_domains")


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule. ``file``/``line`` say where it was written (for "why" questions)."""

    name: str
    description: str
    action: str
    match: Match
    file: str
    line: int
    decision: Decision
    # -- issue 8: who-conditions (egressd.policy.who), containment, severity override
    who: WhoMatch | None = None
    respond: str = ""  # "" | "freeze" | "kill"
    severity: int = 0  # 0: the detection's own EVE severity


class Policy:
    """A loaded, validated, compiled policy. Treat it as immutable; reload builds a new one."""

    __slots__ = (
        "_bare_rules",
        "_by_name",
        "_default_decision",
        "_needs_addr",
        "_undetected_rules",
        "default",
        "fail",
        "files",
        "mode",
        "on_error",
        "on_overload",
        "path",
        "pool_domains",
        "rules",
        "settings",
        "tunnel_service_domains",
        "who_rules",
    )

    def __init__(
        self,
        *,
        path: str | os.PathLike[str],
        files: tuple[str, ...] = (),
        mode: str = "enforce",
        default: str = "accept",
        fail: str = "open",
        on_overload: str = "drop",
        on_error: str = "accept",
        settings: Settings | None = None,
        pool_domains: DomainSet | None = None,
        tunnel_service_domains: DomainSet | None = None,
        rules: tuple[Rule, ...] = (),
    ) -> None:
        self.path = os.fspath(path)
        self.files = files or (self.path,)
        self.mode = mode
        self.default = default
        self.fail = fail
        self.on_overload = on_overload
        self.on_error = on_error
        self.settings = settings if settings is not None else Settings()
        self.pool_domains = pool_domains if pool_domains is not None else DomainSet()
        self.tunnel_service_domains = tunnel_service_domains if tunnel_service_domains is not None else DomainSet()
        # Rules on who is behind a flow are judged after attribution, never for a verdict.
        self.rules = tuple(r for r in rules if r.who is None)
        self.who_rules = tuple(r for r in rules if r.who is not None)
        self._default_decision = Decision(default, "default", "")
        self._needs_addr = any(r.match.uses_address for r in self.rules)
        # A rule that names detections cannot hold for a flow without any: a flow's first
        # judgement (every new flow) and most end-of-inspection judgements skip those rules,
        # most of the shipped policy, instead of testing each (bench/replay.py, py-spy).
        self._undetected_rules = tuple(r for r in self.rules if r.match.kinds is None)
        # A flow's first judgement usually knows nothing but addresses and ports (no name, no
        # detection, content pending): rules that need a name, a detection or the content
        # cannot hold then, and when no other rule is left (the shipped policies) the default
        # decides without a rule being tested.
        self._bare_rules = tuple(
            r for r in self._undetected_rules if r.match.domains is None and not r.match.needs_content
        )
        self._by_name = {r.name: r for r in rules}

    def judge(self, facts: FlowFacts) -> Decision:
        """The first rule whose match holds decides; otherwise the default does.

        Returns shared, preallocated Decision objects (compare by value, never mutate).
        """
        if facts.detections:
            rules = self.rules
        elif facts.domains or facts.content != CONTENT_PENDING:
            rules = self._undetected_rules
        else:
            rules = self._bare_rules
        if not rules:
            return self._default_decision
        if self._needs_addr:
            src = int.from_bytes(facts.src, "big")
            dst = int.from_bytes(facts.dst, "big")
        else:
            src = dst = 0
        for rule in rules:
            if rule.match.test(facts, src, dst):
                return rule.decision
        return self._default_decision

    def needs_content(self) -> bool:
        """True when some rule looks at ``content``: the engine judges again when inspection ends."""
        return any(r.match.uses_content for r in self.rules)

    def judge_who(self, ev: Event, who: dict[str, Any]) -> Rule | None:
        """The first who-rule that holds for an attributed event (egressd.policy.who)."""
        from egressd.policy.who import judge_who

        return judge_who(self.who_rules, ev, who)

    def rule(self, name: str) -> Rule | None:
        """The rule called ``name`` (for explaining a decision), or None."""
        return self._by_name.get(name)

    @property
    def default_decision(self) -> Decision:
        return self._default_decision

    @property
    def bare_is_default(self) -> bool:
        """No rule can hold for a flow known only by addresses and ports (no name, no
        detection, content pending): :meth:`judge` gives it the default decision."""
        return not self._bare_rules

    def __repr__(self) -> str:
        return f"Policy(path={self.path!r}, mode={self.mode!r}, default={self.default!r}, rules={len(self.rules)})"
