from . import io


class ComfyExtension:
    async def get_node_list(self):
        return []


__all__ = ["ComfyExtension", "io"]
