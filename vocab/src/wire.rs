//! Chat messages on the wire (the public and the worker protocol) as the
//! template code takes them, and back: one conversion for every process.

use nanoinfer_proto::{nanoinfer as public, worker};

use crate::{ChatMessage, ToolCall};

/// Both protocols' `ChatMessage` have the same fields.
macro_rules! from_wire {
    ($wire:ty) => {
        impl From<$wire> for ChatMessage {
            fn from(m: $wire) -> Self {
                ChatMessage {
                    role: m.role,
                    content: m.content,
                    tool_calls: m
                        .tool_calls
                        .into_iter()
                        .map(|c| ToolCall {
                            id: c.id,
                            name: c.name,
                            arguments: c.arguments,
                        })
                        .collect(),
                    tool_call_id: m.tool_call_id,
                    name: m.name,
                }
            }
        }
    };
}

from_wire!(public::ChatMessage);
from_wire!(worker::ChatMessage);

impl From<&ChatMessage> for worker::ChatMessage {
    fn from(m: &ChatMessage) -> Self {
        worker::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| worker::ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                })
                .collect(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        }
    }
}

/// `(role, content)` of each message, for the shared limit checks
/// (`nanoinfer_proto::limits::Limits::check_prompt_or_messages`).
pub fn roles_and_contents(messages: &[ChatMessage]) -> Vec<(&str, &str)> {
    messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_crosses_both_protocols_unchanged() {
        let m = ChatMessage {
            role: "assistant".into(),
            content: "x".into(),
            tool_calls: vec![ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
            tool_call_id: "t".into(),
            name: "n".into(),
        };
        let w = worker::ChatMessage::from(&m);
        assert_eq!(ChatMessage::from(w.clone()), m);
        let p = public::ChatMessage {
            role: w.role,
            content: w.content,
            tool_calls: vec![public::ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "{}".into(),
            }],
            tool_call_id: w.tool_call_id,
            name: w.name,
        };
        assert_eq!(ChatMessage::from(p), m);
        assert_eq!(roles_and_contents(&[m]), vec![("assistant", "x")]);
    }
}
