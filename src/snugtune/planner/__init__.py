"""The memory planner: the inventory of a model (inventory), its peak memory by component (memory), the card
budgets (cards), the step-time model (step_time), choosing the fastest settings that fit (choose), the plan
they make (plan), the plans a run starts with and steps down to (apply), and what it tells a person (explain)."""
