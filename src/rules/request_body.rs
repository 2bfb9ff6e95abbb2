//! The few facts the rules need from a Mistral JSON request body.

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON, or a field of the wrong type.
    NotJson,
    NotObject,
}

/// Only these fields are decoded; serde skips the rest (messages, tools, ...) without building
/// them.
#[derive(Deserialize)]
struct Fields {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
}

pub fn parse_request_body(body: &[u8]) -> Result<RequestFacts, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            if first.is_some() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
                BodyError::NotObject
            } else {
                BodyError::NotJson
            },
        );
    }
    let fields: Fields = serde_json::from_slice(body).map_err(|_| BodyError::NotJson)?;
    Ok(RequestFacts {
        model: fields.model,
        max_tokens: fields.max_tokens,
        stream: fields.stream.unwrap_or(false),
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
                stream: true
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
    }
}
