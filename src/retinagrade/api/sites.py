"""The site profiles a service runs with, and which one a request gets.

``RETINAGRADE_SITE_PROFILES`` names one or several profiles (``retinagrade calibrate``); each one reads the
same loaded model with its own operating point (:meth:`GradingPipeline.with_spec`, sharing the ONNX session)
and watches its own drift. A request picks a site by name; without one it gets the default site. With no
profiles the service grades with the model's global operating point, under the empty site name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinagrade.errors import SiteProfileError, UnknownSiteError
from retinagrade.inference.site_profile import SiteProfile, load_profiles
from retinagrade.monitoring.drift import DEFAULT_MIN_COUNT, DEFAULT_WINDOW, DriftMonitor
from retinagrade.pipeline import GradingPipeline

#: The metric label of the drift watch when no profile is configured (the spec's own reference).
NO_SITE_LABEL = "none"
SITE_HEADER = "X-Retinagrade-Site"
OPERATING_POINT_HEADER = "X-Retinagrade-Operating-Point"


@dataclass(frozen=True)
class Site:
    """One operating point the service grades with.

    Attributes:
        name: the profile's name; empty for the model's global operating point.
        pipeline: the shared pipeline read with this site's spec.
        profile: the site profile, or None.
        drift: the drift watch, when a reference exists (the profile's, else the spec's ``drift_reference``).
    """

    name: str
    pipeline: GradingPipeline
    profile: SiteProfile | None
    drift: DriftMonitor | None

    @property
    def metric_label(self) -> str:
        return self.name or NO_SITE_LABEL

    def at_operating_point(self, name: str | None) -> Site:
        """This site deciding referrals at another named point (None or empty: its own).

        Raises:
            UnknownOperatingPointError: neither the model nor the site's profile has a point of that name.
        """
        if not name:
            return self
        return dataclasses.replace(self, pipeline=self.pipeline.at_operating_point(name))


def _monitor(reference: Mapping[str, Any], window: int, min_count: int, where: str) -> DriftMonitor | None:
    if not reference:
        return None
    try:
        return DriftMonitor(reference, window=window, min_count=min_count)
    except (KeyError, TypeError, ValueError) as exc:
        raise SiteProfileError(f"the drift reference of {where} is malformed: {exc}") from exc


class SiteRegistry:
    """The configured sites, built once at start-up; refuses a profile for another model there."""

    def __init__(self, sites: dict[str, Site], default: str) -> None:
        self.sites = sites
        self.default = default

    @classmethod
    def load(
        cls,
        pipeline: GradingPipeline,
        profile_paths: list[Path],
        default: str | None = None,
        window: int = DEFAULT_WINDOW,
        min_count: int = DEFAULT_MIN_COUNT,
    ) -> SiteRegistry:
        """Load the profiles for ``pipeline``'s model.

        Raises:
            SiteProfileError: a profile is unreadable, belongs to another model, two share a name, or the
                default names none of them (or several are configured and no default is).
        """
        profiles = load_profiles(profile_paths, pipeline.spec)
        if not profiles:
            if default:
                raise SiteProfileError(f"the default site {default!r} is set but no site profiles are configured")
            reference = pipeline.spec.raw.get("drift_reference") or {}
            monitor = _monitor(reference, window, min_count, "the model spec")
            return cls({"": Site("", pipeline, None, monitor)}, "")
        if default is None:
            if len(profiles) > 1:
                raise SiteProfileError(
                    f"{len(profiles)} site profiles are configured ({', '.join(sorted(profiles))}): name the default "
                    "one in RETINAGRADE_DEFAULT_SITE"
                )
            default = next(iter(profiles))
        if default not in profiles:
            raise SiteProfileError(f"the default site {default!r} is not among the profiles ({', '.join(profiles)})")
        sites = {
            name: Site(
                name,
                pipeline.with_spec(profile.apply(pipeline.spec)),
                profile,
                _monitor(profile.drift_reference, window, min_count, f"site profile {name!r}"),
            )
            for name, profile in profiles.items()
        }
        return cls(sites, default)

    def resolve(self, name: str | None, operating_point: str | None = None, evidence: str = "severity") -> Site:
        """The site a request asked for (None or empty: the default), at the operating point it asked for, with
        explanations of the head it asked for (``severity`` or ``dme``).

        Raises:
            UnknownSiteError: the service was not started with a profile of that name.
            UnknownOperatingPointError: the site's model (or profile) has no operating point of that name.
            UnknownEvidenceError: the model has no such head.
        """
        if not name:
            site = self.sites[self.default]
        else:
            found = self.sites.get(name.strip())
            if found is None or not found.name:
                known = ", ".join(sorted(n for n in self.sites if n)) or "none"
                raise UnknownSiteError(f"No site profile named {name[:64]!r} is loaded (sites: {known}).")
            site = found
        site = site.at_operating_point(operating_point)
        return dataclasses.replace(site, pipeline=site.pipeline.showing(evidence))

    def cards(self) -> dict[str, Any]:
        """What ``/v1/model`` shows about the sites."""
        return {
            "operating_point": self.sites[self.default].pipeline.spec.operating_point,
            "default_site": self.default or None,
            "site_profiles": [site.profile.public_card() for site in self.sites.values() if site.profile is not None],
        }
