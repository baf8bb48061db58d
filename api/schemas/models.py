from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from models.model_store import BaseModelInfo


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "grove"
    description: str = ""
    max_lora_rank: int
    context_length: int
    parameters: int | None = None

    @classmethod
    def from_info(cls, info: BaseModelInfo) -> ModelObject:
        return cls(
            id=info.name,
            created=info.created,
            description=info.description,
            max_lora_rank=info.max_lora_rank,
            context_length=info.context_length,
            parameters=info.parameters,
        )
