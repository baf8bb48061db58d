from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from models.model_store import BaseModelInfo


class ModelObject(BaseModel):
    id: str = Field(description="The model's name in the model store: what a job's `model` names.")
    object: Literal["model"] = Field("model", description="Always 'model'.")
    created: int = Field(description="When the model was prepared or imported (Unix seconds).")
    owned_by: str = Field("grove", description="Always 'grove': the operator's model store.")
    description: str = Field("", description="What the model is and where it came from.")
    max_lora_rank: int = Field(description="Largest LoRA rank (adapter.r) a fine-tune of this model may use.")
    context_length: int = Field(description="Longest sequence, in tokens, the model takes.")
    parameters: int | None = Field(None, description="Parameter count, when known.")

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


class ModelDeleted(BaseModel):
    id: str = Field(description="The deleted model's id.")
    object: Literal["model"] = Field("model", description="Always 'model'.")
    deleted: bool = Field(True, description="Always true.")
