"""moshi-ttt server: FastAPI + uvicorn websockets, batched sessions over one TTT-Moshi."""
