"""Reporting across runs: the paper-layout table (`evoexp-table`) and the per-run figures."""
