//! A VICI client for charon: one Unix socket connection, one request at a time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::vici::{self, Message, Packet};

/// How long one request may take; charon answers in milliseconds unless it is stuck.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ViciError {
    #[error("VICI socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("VICI {command}: charon does not know the command")]
    Unknown { command: String },
    #[error("VICI {command}: charon refused: {why}")]
    Refused { command: String, why: String },
    #[error("VICI {command}: {why}")]
    Protocol { command: String, why: String },
}

impl ViciError {
    /// Whether the connection is gone (charon stopped or restarted): reconnect before retrying.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ViciError::Io { .. })
    }
}

pub struct Charon {
    path: PathBuf,
    stream: UnixStream,
}

impl Charon {
    pub async fn connect(path: &Path) -> Result<Charon, ViciError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ViciError::Io {
                path: path.into(),
                source,
            })?;
        Ok(Charon {
            path: path.into(),
            stream,
        })
    }

    fn io(&self, source: io::Error) -> ViciError {
        ViciError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends `command` and returns charon's response message.
    pub async fn request(&mut self, command: &str, msg: &Message) -> Result<Message, ViciError> {
        let protocol = |why: String| ViciError::Protocol {
            command: command.into(),
            why,
        };
        let packet = vici::request_packet(command, msg).map_err(|e| protocol(e.to_string()))?;
        let exchange = async {
            self.stream.write_all(&packet).await?;
            loop {
                let len = self.stream.read_u32().await? as usize;
                if len > vici::MAX_PACKET {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("packet of {len} bytes"),
                    ));
                }
                let mut body = vec![0; len];
                self.stream.read_exact(&mut body).await?;
                let parsed = vici::parse_packet(&body)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // Events only come for registrations; we make none, but skip any.
                if parsed.kind != vici::EVENT {
                    return Ok(parsed);
                }
            }
        };
        let reply: Packet = match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(r) => r.map_err(|e| self.io(e))?,
            Err(_) => {
                return Err(self.io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer to {command} within {REQUEST_TIMEOUT:?}"),
                )))
            }
        };
        match reply.kind {
            vici::CMD_RESPONSE => Ok(reply.message),
            vici::CMD_UNKNOWN => Err(ViciError::Unknown {
                command: command.into(),
            }),
            other => Err(protocol(format!("unexpected packet type {other}"))),
        }
    }

    /// A request whose response carries `success = yes|no` and `errmsg`.
    pub async fn command(&mut self, command: &str, msg: &Message) -> Result<(), ViciError> {
        let reply = self.request(command, msg).await?;
        match reply.str("success").as_deref() {
            Some("yes") => Ok(()),
            _ => Err(ViciError::Refused {
                command: command.into(),
                why: reply
                    .str("errmsg")
                    .unwrap_or_else(|| format!("answer {reply}")),
            }),
        }
    }

    /// The names of the connections charon has loaded.
    pub async fn connection_names(&mut self) -> Result<Vec<String>, ViciError> {
        let reply = self.request("get-conns", &Message::new()).await?;
        Ok(reply.strs("conns").unwrap_or_default())
    }
}
