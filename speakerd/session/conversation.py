"""What the session remembers of one conversation: its responses, tool rounds and turns.

Bookkeeping only: nothing here emits an action or changes the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speakerd.realtime import protocol as p

# A tool round's create_sent when it gets no response.create at all.
NO_CREATE = "none: the user moved on, or no server to answer"


@dataclass
class Response:
    """What the session knows of one model response."""

    id: str
    audio_ms: float = 0.0
    item_id: str | None = None  # the assistant message whose audio is played
    calls: tuple[p.FunctionCall, ...] = ()
    barged_in: bool = False  # the user spoke over it: its tool round gets no response.create


@dataclass
class Turn:
    """Tool round: outputs owed for a response's calls, and its single response.create."""

    response_id: str
    waiting: set[str]
    create_sent: str | None = None  # event_id of the response.create once sent, or NO_CREATE


@dataclass
class Conversation:
    """Everything that lives exactly as long as one conversation."""

    number: int
    end: str | None = None  # an end asked for, carried out after the drain
    error: str | None = None  # an unrecoverable error to show after the drain
    say: str | None = None  # the situation to tell the person about when it ends
    active: str | None = None  # the response between response.created and response.done
    responses: dict[str, Response] = field(default_factory=dict)
    playing: set[str] = field(default_factory=set)  # finished, drain not yet reported
    turns: list[Turn] = field(default_factory=list)
    connected: bool = False
    # The user's turns by number, for transcripts that arrive after the answer began.
    user_turns: int = 0
    turn_of_item: dict[str, int] = field(default_factory=dict)
    turn_of_response: dict[str, int] = field(default_factory=dict)
    mic: bool = False  # streaming to the server, as last told

    def response(self, rid: str) -> Response:
        return self.responses.setdefault(rid, Response(rid))

    def note_turn(self, item_id: str) -> None:
        """A user turn, committed: numbered, so that its transcript finds its place."""
        if item_id not in self.turn_of_item:
            self.user_turns += 1
            self.turn_of_item[item_id] = self.user_turns

    def owed_ms(self) -> float:
        """The audio handed to playback and not yet reported drained."""
        return sum(self.responses[rid].audio_ms for rid in self.playing)

    def round_of(self, call_id: str) -> Turn | None:
        """The tool round still waiting for this call's result, if any."""
        return next((t for t in self.turns if call_id in t.waiting), None)

    def tools_pending(self) -> bool:
        return any(t.create_sent is None for t in self.turns)

    def round_due(self) -> Turn | None:
        """The tool round whose response.create may go out now: all its outputs sent,
        no response active, a server to answer. One at a time: the next waits for
        this one's response."""
        if self.active or not self.connected:
            return None
        return next((t for t in self.turns if t.create_sent is None and not t.waiting), None)

    def abandon_rounds(self) -> None:
        """No tool round gets a response.create from now on (no socket, no server, or the
        user barged in). One already sent stays sent, but is not sent again if refused."""
        for turn in self.turns:
            turn.create_sent = NO_CREATE
