"""The memory planner: predict a run's peak GPU memory by component (memory), choose the fastest settings
that fit a budget (choose, with step_time), apply them to the run's Config and step down after an
out-of-memory error (apply), and say what it chose or why nothing fits (explain)."""

from snugtune.planner.apply import needs_new_model, plan_run, planned_figures, run_config, step_down
from snugtune.planner.choose import Offload, Plan, plan_config, plan_for_budget, settings_for
from snugtune.planner.explain import format_plan, refusal
from snugtune.planner.inventory import inventory_for, model_config_for

__all__ = ["Offload", "Plan", "format_plan", "inventory_for", "model_config_for", "needs_new_model", "plan_config",
           "plan_for_budget", "plan_run", "planned_figures", "refusal", "run_config", "settings_for", "step_down"]
