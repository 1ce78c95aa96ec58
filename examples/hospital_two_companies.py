"""The hospital scenario of the paper's introduction, simulated with Flower.

A hospital gives the images of its patients to one AI company (``vision-co``) and the
recordings to another (``audio-co``). Each company trains its own unimodal network on its own
data and shares only the last layer's Gram matrix W W^T, its class counts and, on request, the
K logits of pseudonymous patients. The coordinator fuses them with Jacobian-regularized late
fusion; the hospital (the requester) hands it the labels of its evaluation patients, by
pseudonym only. The table shows what happens when the audio owner's inputs are corrupted or
attacked (it perturbs its own inputs: the coordinator never sees any input).

Run:  python examples/hospital_two_companies.py        (about a minute on 2 CPU cores)
"""

from pathlib import Path

from jacfusion_fed.cli.logs import quiet_flower
from jacfusion_fed.evaluation import table_to_markdown
from jacfusion_fed.federation.scenario import Scenario, run_scenario

if __name__ == "__main__":
    scenario = Scenario.builtin(
        "avdigits", quick=True, owner_names=["vision-co", "audio-co"], perturbed="audio"
    )
    quiet_flower()  # the table once (printed below), no colour codes in pipes
    result = run_scenario(scenario, Path("runs/examples/hospital-two-companies"))
    print(table_to_markdown(result.table()))
    for modality, head in result.results["heads"].items():
        kind, version = head["head_kind"], head["version"]
        print(f"{modality}: {head['owner']} shared only its {kind} head (version {version})")
    print(f"results: {result.prepared.coordinator_dir / 'results.json'}")
