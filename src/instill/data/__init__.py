"""Instruction data, a building block below every stage: formats -> messages -> (ids, mask) ->
padded or packed rows, the built-in task generator, preference pairs, and EvalExample
(examples.py), the prompt unit of eval, the anchors and pairs. inspect_data.py is `instill data
inspect`, a command over all of it: it loads the tokenizer from models/, so it stands a floor above
(tests/test_structure.py)."""
