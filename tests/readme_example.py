"""The README's first example: the body its curl sends and the JSON it shows as the answer, so that tests
check the README against the shipped demo model byte for byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def curl_example(readme: Path = README) -> tuple[dict, str]:
    """(request body, answer text): the ``-d '...'`` of the first curl to /predictions/jai and the first
    ```json block after it."""
    text = readme.read_text()
    start = text.index("curl ")
    body = re.search(r"-d '([^']*)'", text[start:])
    answer = re.search(r"```json\n(.*?)\n```", text[start:], re.S)
    assert body and answer, "README.md: no curl -d '...' followed by a ```json block"
    assert re.search(r"/predictions/jai\s", text[start:start + body.start()]), "the first curl is not the native API"
    return json.loads(body[1]), answer[1]
