"""HPA-sim: synthetic HPA-style fields of view with per-cell ground truth."""
