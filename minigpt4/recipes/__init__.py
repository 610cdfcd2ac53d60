"""One typed `run(...)` per entry point: recipes.chat.run (chat.py), recipes.evaluate.run
(evaluate.py), recipes.finetune.run (finetune.py). The entry scripts turn the composed Hydra config
into the recipe's settings once (minigpt4/config.py) and call run; a notebook builds the settings
itself, or from config.compose(...)."""
