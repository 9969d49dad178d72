"""Work made of many runs: evaluating a logged run on the test set (evaluate), and the lesson's studies: their
grids (studies), the runner that trains, evaluates and reports them (study_runner) and the leases that let workers
on several hosts share a grid (study_claims)."""
