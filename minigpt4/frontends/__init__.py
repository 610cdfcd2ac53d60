"""The ways a person or a program talks to a ChatSession (minigpt4/chat.py): the terminal
(terminal.py), the browser page (web.py, web_tab.py) and the OpenAI-compatible API (api.py).
They import the session and the serving engine; neither imports them. recipes/chat.py picks one
(ui=terminal|web|api)."""
