//! The few facts the rules need from a Mistral JSON request body.

use std::borrow::Cow;
use std::collections::HashSet;

use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    /// Choices asked for (chat, FIM, agents): completion tokens can reach `n × max_tokens`.
    pub n: Option<u64>,
    /// `completion_args.max_tokens`: the cap conversations read (not a top-level `max_tokens`).
    pub completion_args_max_tokens: Option<u64>,
    /// `max_output_tokens`: the cap of the Responses API.
    pub max_output_tokens: Option<u64>,
    /// How many pages an OCR request names (`pages`), if it names them.
    pub pages: Option<u64>,
    pub stream: bool,
    /// `agent_id`: the upstream runs that agent's model, not the body's `model`.
    pub agent_id: bool,
    /// Tools the upstream runs itself.
    pub server_tools: ServerTools,
}

/// The tools in `tools` that the upstream runs itself: any `type` other than `function` (a
/// function tool is called by the client, which sends its result back). They are billed per call
/// beyond the tokens in `usage`, and some reach the workspace's data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerTools {
    /// Web search, code interpreter, image generation, ...: billed per call.
    pub billed: bool,
    /// `document_library`: searches the workspace's libraries.
    pub reads_workspace: bool,
    /// A connector, or a type this filter does not know: calls the workspace's connectors with
    /// their stored credentials.
    pub calls_connectors: bool,
}

impl ServerTools {
    pub fn any(&self) -> bool {
        self.billed || self.reads_workspace || self.calls_connectors
    }

    fn add(&mut self, kind: Option<&str>) {
        match kind {
            None | Some("function") => {}
            Some("web_search" | "web_search_premium" | "code_interpreter" | "image_generation") => {
                self.billed = true
            }
            Some("document_library") => {
                self.billed = true;
                self.reads_workspace = true;
            }
            // `connector`, and anything newer: the most it could reach.
            Some(_) => {
                self.billed = true;
                self.calls_connectors = true;
            }
        }
    }
}

/// One element of `tools`: only its `type` is read (given twice, the element is refused).
#[derive(Deserialize)]
struct ToolEntry {
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Longest model name accepted; Mistral's (fine-tuned ones included) are far shorter.
pub const MAX_MODEL_NAME: usize = 128;

/// A model name as Mistral spells them (`mistral-small-latest`,
/// `ft:open-mistral-7b:587a6b29:20240514:7e773925`): anything else is refused before it can
/// reach a log line, a stat or a price lookup.
pub fn is_valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODEL_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/@+".contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, or a field of the wrong type, or a key given twice (Python servers take the
    /// last, others the first: ambiguity is refused rather than guessed).
    NotJson,
    NotObject,
    /// `model` is not a model name (control characters, too long, ...).
    BadModelName,
}

/// Only these fields are decoded (of `tools`, each element's `type`); the rest (messages, ...) is
/// skipped without being built.
/// Every top-level key is checked for duplicates, not only the decoded ones.
#[derive(Default)]
struct Fields {
    model: Option<String>,
    max_tokens: Option<u64>,
    n: Option<u64>,
    completion_args: Option<CompletionArgs>,
    max_output_tokens: Option<u64>,
    pages: Option<u64>,
    stream: Option<bool>,
    agent_id: Option<IgnoredAny>,
    tools: Option<Vec<ToolEntry>>,
}

#[derive(Deserialize)]
struct CompletionArgs {
    #[serde(default)]
    max_tokens: Option<u64>,
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut seen = HashSet::new();
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if !seen.insert(key.clone()) {
                return Err(A::Error::custom("a key given twice"));
            }
            match key.as_ref() {
                "model" => f.model = map.next_value()?,
                "max_tokens" => f.max_tokens = map.next_value()?,
                "n" => f.n = map.next_value()?,
                "completion_args" => f.completion_args = map.next_value()?,
                "max_output_tokens" => f.max_output_tokens = map.next_value()?,
                "pages" => {
                    f.pages = map
                        .next_value::<Option<Vec<IgnoredAny>>>()?
                        .map(|p| p.len() as u64)
                }
                "stream" => f.stream = map.next_value()?,
                "agent_id" => f.agent_id = map.next_value()?,
                "tools" => f.tools = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(f)
    }
}

pub fn parse_request_body(body: &[u8]) -> Result<RequestFacts, BodyError> {
    // JSON is UTF-8 (RFC 8259). serde_json does not check the strings it skips, so a body with
    // invalid bytes in, say, `messages` would be judged as JSON that is not (found by fuzzing).
    if std::str::from_utf8(body).is_err() {
        return Err(BodyError::NotJson);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            if first.is_some() && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
                BodyError::NotObject
            } else {
                BodyError::NotJson
            },
        );
    }
    let fields: Fields = serde_json::from_slice(body).map_err(|_| BodyError::NotJson)?;
    if fields
        .model
        .as_deref()
        .is_some_and(|m| !is_valid_model_name(m))
    {
        return Err(BodyError::BadModelName);
    }
    Ok(RequestFacts {
        model: fields.model,
        max_tokens: fields.max_tokens,
        n: fields.n,
        completion_args_max_tokens: fields.completion_args.and_then(|c| c.max_tokens),
        max_output_tokens: fields.max_output_tokens,
        pages: fields.pages,
        stream: fields.stream.unwrap_or(false),
        agent_id: fields.agent_id.is_some(),
        server_tools: fields.tools.unwrap_or_default().iter().fold(
            ServerTools::default(),
            |mut tools, tool| {
                tools.add(tool.kind.as_deref());
                tools
            },
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_fim_and_embedding_bodies() {
        let chat = br#"{"messages":[{"role":"user","content":"hi"}],"model":"mistral-small-latest","max_tokens":64,"stream":true,"temperature":0.2}"#;
        assert_eq!(
            parse_request_body(chat),
            Ok(RequestFacts {
                model: Some("mistral-small-latest".into()),
                max_tokens: Some(64),
                stream: true,
                ..Default::default()
            })
        );
        let embed = br#"{"model":"mistral-embed","input":["a","b"]}"#;
        assert_eq!(parse_request_body(embed).unwrap().max_tokens, None);
        let nulls =
            br#"{"model":"codestral-latest","max_tokens":null,"stream":null,"prompt":"def"}"#;
        assert_eq!(
            parse_request_body(nulls).unwrap(),
            RequestFacts {
                model: Some("codestral-latest".into()),
                ..Default::default()
            }
        );
        assert_eq!(
            parse_request_body(b" {} ").unwrap(),
            RequestFacts::default()
        );
    }

    #[test]
    fn reads_the_tools_the_upstream_runs() {
        let tools = |json: &str| {
            parse_request_body(format!(r#"{{"model":"m","tools":{json}}}"#).as_bytes())
                .map(|f| f.server_tools)
        };
        assert_eq!(tools("null"), Ok(ServerTools::default()));
        assert_eq!(
            tools(r#"[{"type":"function","function":{"name":"f"}},{"function":{}}]"#),
            Ok(ServerTools::default())
        );
        let billed = ServerTools {
            billed: true,
            ..ServerTools::default()
        };
        assert_eq!(tools(r#"[{"type":"web_search_premium"}]"#), Ok(billed));
        assert_eq!(
            tools(r#"[{"type":"document_library","library_ids":["l"]}]"#),
            Ok(ServerTools {
                reads_workspace: true,
                ..billed
            })
        );
        let connector = ServerTools {
            calls_connectors: true,
            ..billed
        };
        assert_eq!(tools(r#"[{"type":"connector"}]"#), Ok(connector));
        assert_eq!(tools(r#"[{"type":"something_new"}]"#), Ok(connector));
        // What cannot be read for sure is refused.
        assert_eq!(
            tools(r#"[{"type":"function","type":"connector"}]"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(tools(r#"{"type":"connector"}"#), Err(BodyError::NotJson));
        assert_eq!(tools(r#"[{"type":7}]"#), Err(BodyError::NotJson));
        assert_eq!(tools(r#"["connector"]"#), Err(BodyError::NotJson));
        let agent = parse_request_body(br#"{"agent_id":"ag_1","inputs":"x"}"#).unwrap();
        assert!(agent.agent_id);
        assert!(
            !parse_request_body(br#"{"agent_id":null}"#)
                .unwrap()
                .agent_id
        );
    }

    #[test]
    fn rejects_what_cannot_be_judged() {
        assert_eq!(parse_request_body(b"not json"), Err(BodyError::NotJson));
        assert_eq!(parse_request_body(b""), Err(BodyError::NotJson));
        assert_eq!(parse_request_body(b"[1,2]"), Err(BodyError::NotObject));
        assert_eq!(
            parse_request_body(br#"{"model":7}"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(br#"{"model":"m","max_tokens":-1}"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(br#"{"model":"m","max_tokens":1.5}"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(br#"{"model":"m""#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(br#"{"model":"a","model":"b"}"#),
            Err(BodyError::NotJson)
        );
        // An escaped key is the same key to every JSON parser: still a duplicate.
        assert_eq!(
            parse_request_body(br#"{"max_tokens":1,"max\u005ftokens":9000}"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(br#"{"completion_args":{"max_tokens":1,"max_tokens":2}}"#),
            Err(BodyError::NotJson)
        );
        // Any top-level key, not only the ones the rules read (found by fuzzing).
        assert_eq!(
            parse_request_body(br#"{"model":"m","messages":[],"messages":[{"role":"user"}]}"#),
            Err(BodyError::NotJson)
        );
        assert_eq!(
            parse_request_body(b"{\"model\":\"m\",\"messages\":\"\xff\"}"),
            Err(BodyError::NotJson)
        );
        // Numbers Python would coerce are refused, not guessed.
        for lax in [
            &br#"{"max_tokens":"100"}"#[..],
            br#"{"max_tokens":1e3}"#,
            br#"{"n":2.0}"#,
        ] {
            assert_eq!(parse_request_body(lax), Err(BodyError::NotJson));
        }
        for name in [r"m\nx", r"m\u0000", "a b", r"\u00e9", r#"x\"y"#] {
            let body = format!(r#"{{"model":"{name}"}}"#);
            assert_eq!(
                parse_request_body(body.as_bytes()),
                Err(BodyError::BadModelName),
                "{name}"
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_NAME + 1));
        assert_eq!(
            parse_request_body(long.as_bytes()),
            Err(BodyError::BadModelName)
        );
    }

    #[test]
    fn reads_every_output_cap() {
        let f = parse_request_body(
            br#"{"model":"ft:open-mistral-7b:587a6b29:20240514:7e773925","n":3,"max_tokens":10,
                 "completion_args":{"max_tokens":20,"temperature":0.1},"max_output_tokens":30,
                 "pages":[0,1,2,3]}"#,
        )
        .unwrap();
        assert_eq!(
            (
                f.n,
                f.max_tokens,
                f.completion_args_max_tokens,
                f.max_output_tokens,
                f.pages
            ),
            (Some(3), Some(10), Some(20), Some(30), Some(4))
        );
    }
}
