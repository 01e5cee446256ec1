"""How many examples the server counts for a deployed site: what it rejects, what it clamps.

A claim above what a site can hold is *rejected*: more than its share of the built-in
dataset (the server knows it), or more than ``deploy.max_examples``. Below that a claim is
*clamped*, never rejected, to the least of: the site's own declaration (its Hello), the
operator's number (``deploy.site_examples``, which vouches for a large site), and otherwise
``deploy.max_size_ratio`` times the median of every connected site's declaration. The
median is the high median of all declarations, the site's own included: a minority of false
declarations moves it by at most their number of ranks, among the honest ones. A clamped
site takes part at the capped weight and is listed in ``clients.clamped`` (for evaluation:
``clients.fed_eval_clamped``). Evaluation counts are held-out examples, capped the same way.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from fedforge.config.system import DeployConfig
from fedforge.core.records import FIT
from fedforge.data.federated import FederatedDataset
from fedforge.net.hub import Hub

log = logging.getLogger("fedforge")


def outlier_cap(declared: list[int], ratio: float) -> int | None:
    """The most a site counts next to every site's declared size (its own included):
    ``ratio`` times their high median (None without a ratio or without declarations)."""
    sizes = [n for n in declared if n > 0]
    if ratio <= 0 or not sizes:
        return None
    return max(1, int(ratio * statistics.median_high(sizes)))


@dataclass
class SiteSizes:
    """The example counts of a deployment's sites (``name_of``: a client id's name)."""

    hub: Hub
    deploy: DeployConfig
    data: FederatedDataset | None  # the built-in dataset (None: a run on the sites' own data)
    name_of: Callable[[int], str]
    logged: set[tuple[str, str, int]] = field(default_factory=set)

    def _known(self, cid: int, stage: str) -> int | None:
        """The site's share of the built-in dataset (training or held-out), if it has one."""
        builtin = self.deploy.client_data == "builtin" and self.data is not None
        if not builtin or self.data is None or cid >= self.data.num_clients:
            return None
        return self.data.client_size(cid) if stage == FIT else self.data.holdout_size(cid)

    def _declared(self, cid: int, stage: str) -> int:
        session = self.hub.session_for(cid)
        if session is None:
            return 0
        return session.declared_examples if stage == FIT else session.declared_holdout

    def limit(self, cid: int, stage: str) -> int:
        """The largest claim accepted (a larger one is rejected): the site's built-in share,
        else ``deploy.max_examples`` (for evaluation: 0 until it declared a held-out set)."""
        most = self.deploy.max_examples
        known = self._known(cid, stage)
        if known is not None:
            return min(known, most)
        return most if stage == FIT or self._declared(cid, stage) > 0 else 0

    def count_cap(self, cid: int, stage: str) -> int | None:
        """The most the site counts (a larger claim is clamped to it); None: no cap."""
        name, d = self.name_of(cid), self.deploy
        declared = self._declared(cid, stage)
        caps = [declared] if declared > 0 else []
        if stage == FIT and name in d.site_examples:
            caps.append(d.site_examples[name])  # the operator vouches: no median cap
        else:
            everyone = self.hub.declared_sizes(holdout=stage != FIT)
            limit = outlier_cap(list(everyone.values()), d.max_size_ratio)
            if limit is not None and declared > limit:
                self._log_once(name, stage, declared, limit)
            caps += [limit] if limit is not None else []
        return min(caps) if caps else None

    def _log_once(self, name: str, stage: str, declared: int, limit: int) -> None:
        if (name, stage, limit) in self.logged:
            return
        self.logged.add((name, stage, limit))
        what = "examples" if stage == FIT else "held-out examples"
        log.warning(
            "client %s declares %d %s, more than %g x the median the connected clients "
            "declare: it counts %d (clamped, still taking part; set deploy.site_examples "
            "to vouch for a large site)",
            name,
            declared,
            what,
            self.deploy.max_size_ratio,
            limit,
        )
