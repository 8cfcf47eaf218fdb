"""Job-wide progress from per-node events (pure)."""
from workers.progress import ProgressTracker

GRAPH = {
    "84": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
    "352": {"class_type": "StoryDiffusion_KSampler", "inputs": {"steps": 10}},
    "85": {"class_type": "SaveImage", "inputs": {}},
}


def test_sampler_steps_carry_the_weight_and_percent_never_falls():
    tracker = ProgressTracker(GRAPH)
    assert tracker.executing("84").percent == 0.0
    halfway = tracker.step("352", 5, 10)
    assert halfway.percent == round(100 * (1 + 5) / 12, 1) and (halfway.node, halfway.step, halfway.max) == ("352", 5, 10)
    assert tracker.step("352", 3, 10).percent >= halfway.percent  # a late, lower value does not move it back
    assert tracker.finished().percent == 100.0


def test_sampler_that_runs_once_per_scene_counts_every_round():
    tracker = ProgressTracker(GRAPH, {"352": 3})  # three scenes: the steps restart twice
    tracker.executing("84")
    seen = [tracker.step("352", step, 10).percent for _ in range(3) for step in range(1, 11)]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # strictly rising through all rounds
    assert seen[9] < 40 < seen[19] < 70 < seen[-1] < 100


def test_cached_nodes_count_as_done():
    tracker = ProgressTracker(GRAPH)
    assert tracker.cached(["84", "352"]).percent == round(100 * 11 / 12, 1)
