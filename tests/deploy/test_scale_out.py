"""Scale-out without GPUs: Ray's cluster utilities build a multi-node cluster shaped like deploy/kuberay/
raycluster.yaml (fake GPUs, the oirl_<group> custom resources), and the placement plan of configs/gpu.yaml is placed
on it with the driver's own actor options: the actors start and report where they landed. Then a real learner rank
on a learner node and a real vLLM engine on a rollout node (CPU: the GPUs are fake) sync weights across the nodes
over the collective transport, which is what `auto` picks there."""

import pytest
import ray
from conftest import requires_loopback
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from oirl.config import REPO_ROOT, load_config
from oirl.manifests import ray_manifest
from oirl.plan import actor_options, learner_bundles, parse_cpu, placement_plan

pytestmark = [pytest.mark.slow, requires_loopback]


@ray.remote
class Probe:
    def where(self):
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.get_gpu_ids()


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local cluster
        ray.shutdown()
    manifest = ray_manifest(REPO_ROOT / "deploy" / "kuberay" / "raycluster.yaml")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    groups = {}
    for g in manifest["spec"]["workerGroupSpecs"]:
        params = g["rayStartParams"]
        for _ in range(g["replicas"]):
            node = c.add_node(num_cpus=parse_cpu(params["num-cpus"]), num_gpus=float(params.get("num-gpus", 0)),
                              resources={f"oirl_{g['groupName']}": 1000})
            groups.setdefault(g["groupName"], []).append(node.node_id)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield groups
    ray.shutdown()
    c.shutdown()


def test_gpu_plan_places_every_role_on_its_group(cluster):
    cfg = load_config(REPO_ROOT / "configs" / "gpu.yaml", check_paths=False)
    plan = {p.role: p for p in placement_plan(cfg)}
    engines = [Probe.options(**actor_options(cfg, "rollout")).remote() for _ in range(plan["rollout"].count)]
    reward = Probe.options(**actor_options(cfg, "reward")).remote()
    pg = placement_group(learner_bundles(cfg), strategy="PACK")
    ray.get(pg.ready(), timeout=60)
    ranks = [Probe.options(**actor_options(cfg, "learner"), scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=i)).remote() for i in range(plan["learner"].count)]
    try:
        where = {
            "rollout": ray.get([e.where.remote() for e in engines], timeout=60),
            "learner": ray.get([r.where.remote() for r in ranks], timeout=60),
            "reward": ray.get([reward.where.remote()], timeout=60),
        }
    finally:  # free the nodes for the next test
        for actor in [*engines, *ranks, reward]:
            ray.kill(actor)
        ray.util.remove_placement_group(pg)
    for role, placed in where.items():
        assert {node for node, _ in placed} <= set(cluster[role]), f"{role} placed outside its worker group"
    # One GPU per engine and per rank, no GPU shared between two actors on a node.
    for role in ("rollout", "learner"):
        assert all(len(gpus) == 1 for _, gpus in where[role])
        assert len({(node, tuple(g)) for node, g in where[role]}) == plan[role].count
    assert where["reward"][0][1] == []
    # 4 ranks x 1 GPU in the one learner pod of 4 GPUs (a node's learner GPUs share a pod): all on it.
    assert {node for node, _ in where["learner"]} == set(cluster["learner"]) and len(cluster["learner"]) == 1


def test_a_plan_larger_than_the_cluster_fails_clearly_and_frees_its_claim(cluster, tiny_model_path):
    import dataclasses

    from learner.group import LearnerGroup

    cfg = load_config(REPO_ROOT / "configs" / "gpu.yaml", ["learner.num_ranks=8", "learner.num_minibatches=1"],
                      check_paths=False)
    with pytest.raises(RuntimeError, match=r"learner placement group .* was not placed within 5.0s: the cluster "
                                           "lacks the CPUs/GPUs; lower learner.num_ranks"):
        LearnerGroup(dataclasses.replace(cfg.learner, timeout_s=5.0), tiny_model_path, "float32", 0, 1.0, "too-big",
                     micro_batch=1, resources=actor_options(cfg, "learner").get("resources"))
    (state,) = [g["state"] for g in ray.util.placement_group_table().values() if g["name"] == "oirl-learner-too-big"]
    assert state == "REMOVED"


def test_collective_sync_crosses_nodes(cluster, tiny_model_path):
    from actors.rollout_worker import RolloutConfig, RolloutWorker, SyncConfig
    from learner.group import LearnerGroup
    from learner.learner_worker import LearnerConfig
    from oirl.sync import checkpoint_tensors, choose_transport, form_weight_group, sync_weights

    learner = LearnerGroup(LearnerConfig(num_ranks=1, num_cpus=1, timeout_s=120), tiny_model_path, "float32", 0, 1.0,
                           "xnode", micro_batch=2, resources={"oirl_learner": 1})
    engine = ray.remote(RolloutWorker).options(num_cpus=1, resources={"oirl_rollout": 1}).remote(
        RolloutConfig(samples_per_prompt=2, max_new_tokens=6), tiny_model_path, "float32", 0, 0)
    try:
        learner_node, engine_node = learner.call_rank0("node_id"), ray.get(engine.node_id.remote(), timeout=300)
        assert learner_node in cluster["learner"] and engine_node in cluster["rollout"]
        transport = choose_transport("auto", learner_node, [engine_node])
        assert transport == "collective"
        batch = ray.get(engine.generate.remote([0, 1], [[1, 40, 41], [1, 50]], 0), timeout=300)
        form_weight_group(learner, [engine], timeout_s=120)
        for version in (1, 2):
            stats = sync_weights(learner, [engine], version, SyncConfig(bucket_mb=1), transport, batch,
                                 checkpoint_tensors(tiny_model_path))
            assert stats["sync/bytes"] == stats["sync/expected_bytes"] > 0
            assert stats["sync/logprob_max_abs_diff"] < 1e-3
            served = ray.get(engine.served.remote(), timeout=60)["workers"][0]
            assert served["version"] == version
    finally:
        ray.get(engine.shutdown.remote(), timeout=60)
        ray.kill(engine)
        learner.shutdown()
