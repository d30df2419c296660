"""The ArcFlow method itself: the policy, the imitation rollout, the schedule and the n-NFE samplers. Names no model family."""
