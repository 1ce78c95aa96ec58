"""Several sites per modality: two clinics each hold the audio recordings of *different*
patients. They train one audio network together with FedAvg through Flower (the coordinator
averages their parameters each round; no recording leaves a clinic), then both publish the
same content-hashed model version and the coordinator registers one audio head. The imaging
company trains alone. Evaluation ids are answered by whichever site holds the patient.

Run:  python examples/multi_site.py        (about two minutes on 2 CPU cores)
"""

from pathlib import Path

from jacfusion_fed.cli.logs import quiet_flower
from jacfusion_fed.evaluation import table_to_markdown
from jacfusion_fed.federation.scenario import Scenario, run_scenario

if __name__ == "__main__":
    scenario = Scenario.builtin(
        "avdigits",
        quick=True,
        sites_per_modality={"image": 1, "audio": 2},
        owner_names=["vision-co", "clinic"],
        fedavg_rounds=3,
    )
    for owner in scenario.owners:
        print(f"{owner.name:14s} {owner.modality:6s} {owner.data}")
    quiet_flower()  # the table once (printed below), no colour codes in pipes
    result = run_scenario(scenario, Path("runs/examples/multi-site"))
    print(table_to_markdown(result.table()))
    audio = result.results["heads"]["audio"]
    print(
        f"audio head: FedAvg over {audio['sites']} sites, {audio['fedavg_rounds']} rounds, "
        f"version {audio['version']}, per-site metrics {audio['metrics']}"
    )
