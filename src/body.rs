//! The response body type of [`Fence`](crate::Fence).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response that went through a [`Fence`](crate::Fence).
    ///
    /// It is either a body served from the cache (or buffered while filling
    /// it), or the inner service's body streamed through, possibly after a
    /// prefix that was buffered before the body turned out too large to cache.
    ///
    /// Its data is always [`Bytes`] and its error the inner body's error: the
    /// cache adds no error of its own.
    ///
    /// # Example
    ///
    /// A fenced service answers `Response<FenceBody<B>>` for an inner
    /// service answering `Response<B>`; read it like any [`Body`]:
    ///
    /// ```no_run
    /// use bytes::Bytes;
    /// use cachefence::{FenceBody, FenceLayer};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// # async fn doc(conn: redis::aio::ConnectionManager) -> Result<(), Box<dyn std::error::Error>> {
    /// let origin = service_fn(|_req: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
    /// });
    /// let fenced = FenceLayer::new(conn).layer(origin);
    /// let response: http::Response<FenceBody<Full<Bytes>>> =
    ///     fenced.oneshot(http::Request::get("/greeting").body(())?).await?;
    /// let body: Bytes = response.into_body().collect().await?.to_bytes();
    /// assert_eq!(body, "hello");
    /// # Ok(())
    /// # }
    /// ```
    pub struct FenceBody<B: Body> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B: Body> {
        Buffered {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
            error: Option<B::Error>,
        },
        Inner {
            #[pin]
            inner: B,
        },
        Rest {
            prefix: Option<Bytes>,
            rest: Pin<Box<B>>,
        },
    }
}

impl<B: Body> FenceBody<B> {
    /// A complete body (from the cache or fully buffered).
    pub(crate) fn full(data: Bytes) -> Self {
        Self::buffered(data, None, None)
    }

    /// An empty body (a HEAD response, or a body-less status).
    pub(crate) fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// Buffered data, then optionally the trailers or the error the inner body
    /// ended with.
    pub(crate) fn buffered(
        data: Bytes,
        trailers: Option<HeaderMap>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            state: State::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
                error,
            },
        }
    }

    /// The whole body, when it is held complete in memory (no trailers, no
    /// error): what a range can be cut from.
    pub(crate) fn as_full(&self) -> Option<Bytes> {
        match &self.state {
            State::Buffered {
                data,
                trailers: None,
                error: None,
            } => Some(data.clone().unwrap_or_default()),
            _ => None,
        }
    }

    /// The inner body, streamed through untouched.
    pub(crate) fn inner(inner: B) -> Self {
        Self {
            state: State::Inner { inner },
        }
    }

    /// The rest of a body that was too large to buffer, after the `prefix`
    /// that was read before that was known.
    pub(crate) fn rest(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            state: State::Rest {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B: Body> Body for FenceBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().state.project() {
            StateProj::Buffered {
                data,
                trailers,
                error,
            } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(trailers) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(error.take().map(Err))
            }
            StateProj::Inner { inner } => poll_bytes(inner, cx),
            StateProj::Rest { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                poll_bytes(rest.as_mut(), cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Buffered {
                data,
                trailers,
                error,
            } => data.is_none() && trailers.is_none() && error.is_none(),
            State::Inner { inner } => inner.is_end_stream(),
            State::Rest { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            State::Inner { inner } => inner.size_hint(),
            State::Rest { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(extra));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(extra));
                }
                out
            }
        }
    }
}

impl<B: Body> fmt::Debug for FenceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            State::Buffered { data, .. } => f
                .debug_struct("FenceBody")
                .field("buffered", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            State::Inner { .. } | State::Rest { .. } => f
                .debug_struct("FenceBody")
                .field("streaming", &true)
                .finish(),
        }
    }
}

fn poll_bytes<B: Body>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    let frame = ready!(body.poll_frame(cx));
    Poll::Ready(frame.map(|frame| {
        frame.map(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
    }))
}

/// What buffering a body up to a limit ended with.
pub(crate) enum Buffered<B: Body> {
    /// The whole body, with its trailers if it had any.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body is larger than the limit: what was read so far and the rest.
    TooLarge { prefix: Bytes, rest: Pin<Box<B>> },
    /// The body failed after `data`.
    Failed { data: Bytes, error: B::Error },
    /// The deadline passed before the body ended: what was read so far and
    /// the rest (a slow or endless stream).
    Unfinished { prefix: Bytes, rest: Pin<Box<B>> },
}

/// The most a body's size hint makes the buffer reserve up front; a larger
/// body grows it as its data arrives.
const MAX_RESERVE: usize = 1024 * 1024;

/// Reads `body` until its end, until more than `limit` bytes were read, or
/// until `deadline`.
pub(crate) async fn buffer<B: Body>(
    body: B,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Buffered<B> {
    let mut body = Box::pin(body);
    let mut buf = bytes::BytesMut::new();
    // Preallocate when the body says how long it is, but never past the limit.
    if let Some(exact) = body.size_hint().exact() {
        if exact as usize > limit {
            return Buffered::TooLarge {
                prefix: Bytes::new(),
                rest: body,
            };
        }
        buf.reserve((exact as usize).min(MAX_RESERVE));
    }
    loop {
        let next = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
        let Ok(frame) = tokio::time::timeout_at(deadline, next).await else {
            return Buffered::Unfinished {
                prefix: buf.freeze(),
                rest: body,
            };
        };
        match frame {
            None => {
                return Buffered::Complete {
                    data: buf.freeze(),
                    trailers: None,
                };
            }
            Some(Err(error)) => {
                return Buffered::Failed {
                    data: buf.freeze(),
                    error,
                };
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        buf.extend_from_slice(chunk);
                        let n = chunk.len();
                        data.advance(n);
                    }
                    if buf.len() > limit {
                        return Buffered::TooLarge {
                            prefix: buf.freeze(),
                            rest: body,
                        };
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().ok();
                    // Anything after the trailers is not part of the body.
                    return Buffered::Complete {
                        data: buf.freeze(),
                        trailers,
                    };
                }
            },
        }
    }
}
