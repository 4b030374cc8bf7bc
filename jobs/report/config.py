"""What the report shows and how its category shift is estimated (`crossdiff report --config`,
the pipeline's `report:` section). Saved in report.json beside what it produced."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffing.config import Frozen


class ReportConfig(Frozen):
    max_cards: int = Field(40, ge=0, description="Latent cards per model-specific group, most robust first.")
    baseline_cards: int = Field(12, ge=0, description="Cards of the random shared baseline.")
    contexts_per_card: int = Field(5, ge=0, description="Max-activating contexts shown on each card.")
    min_count: int = Field(
        5,
        ge=0,
        description="Categories with fewer latents than this on either side are flagged (never dropped).",
    )
    ci_method: Literal["katz", "score", "bootstrap"] = Field(
        "katz",
        description="Confidence interval of each category's shift: 'katz' (log method; conservative at "
        "small counts, lopsided when the two groups differ much in size), 'score' (Miettinen–Nurminen; "
        "both tails near nominal also for groups of different sizes) or 'bootstrap' (seeded, parametric).",
    )
    ci_level: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the intervals.")
    ci_adjust: Literal["none", "bonferroni"] = Field(
        "none",
        description="'bonferroni': each interval at level 1 − (1 − ci_level)/K over the K categories, so the "
        "whole table holds at ci_level (reading many categories at once); 'none': each on its own.",
    )
    bootstrap_reps: int = Field(10_000, ge=100, description="Replicates of ci_method='bootstrap'.")
    bootstrap_seed: int = Field(0, ge=0, description="Seed of ci_method='bootstrap'.")

    def shift_kwargs(self) -> dict:
        """The arguments of diffing.stats.category_shift these settings choose."""
        return {
            "alpha": 1 - self.ci_level,
            "method": self.ci_method,
            "adjust": self.ci_adjust,
            "min_count": self.min_count,
            "bootstrap_reps": self.bootstrap_reps,
            "seed": self.bootstrap_seed,
        }

    def ci_label(self) -> str:
        """How the tables and plots name the interval, with its method: e.g. '95% CI (Katz)' or
        '90% CI (score, Bonferroni)'."""
        pct = f"{100 * self.ci_level:g}%"
        how = {"katz": "Katz", "score": "score", "bootstrap": "bootstrap"}.get(self.ci_method, self.ci_method)
        return f"{pct} CI ({how}" + (", Bonferroni)" if self.ci_adjust == "bonferroni" else ")")

    def ci_caption(self, n_categories: int) -> str:
        """One line under a shift table: what its interval is and what it leaves out, so a reader
        does not take it for the whole uncertainty of the finding."""
        how = {
            "katz": "Katz log-ratio (Haldane's correction at zero counts)",
            "score": "Miettinen–Nurminen score",
            "bootstrap": f"parametric bootstrap ({self.bootstrap_reps} replicates, seed {self.bootstrap_seed})",
        }.get(self.ci_method, self.ci_method)
        level = f"{100 * self.ci_level:g}%"
        if self.ci_adjust == "bonferroni":
            each = 100 * (1 - (1 - self.ci_level) / max(n_categories, 1))
            adj = f"Bonferroni-adjusted over the {n_categories} categories (each at {each:.4g}%, the table at {level})"
        else:
            adj = f"not adjusted for reading {n_categories} categories at once (ci_adjust=none)"
        return (
            f"Intervals: {how}, {level}; {adj}. They treat each group's labelled latents as a binomial "
            "sample and ignore judge error and crosscoder-seed variation (which latents a refit selects), "
            "so the real uncertainty is larger."
        )
