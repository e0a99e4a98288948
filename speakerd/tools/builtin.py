"""The tools speakerd ships: the time, and ending the conversation."""

from __future__ import annotations

import datetime

from speakerd.tools import Tool

NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


async def get_time() -> dict[str, str]:
    now = datetime.datetime.now().astimezone()
    return {"date": now.strftime("%A %d %B %Y"), "time": now.strftime("%H:%M"),
            "timezone": now.tzname() or ""}


async def end_conversation() -> dict[str, bool]:
    return {"ending": True}


GET_TIME = Tool("get_time", "The local date and time on the speaker, in its timezone.",
                NO_ARGS, get_time)
END_CONVERSATION = Tool(
    "end_conversation", "End the conversation once your current answer has been spoken: "
    "call it when the user says goodbye or that they are done.", NO_ARGS, end_conversation,
    ends_conversation=True)

BUILTIN = {t.name: t for t in (GET_TIME, END_CONVERSATION)}
