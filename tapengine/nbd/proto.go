package nbd

import (
	"errors"
	"fmt"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// Limits this server enforces on what peers send.
const (
	// MaxPayload is the largest READ or WRITE payload accepted, advertised
	// as NBD_INFO_BLOCK_SIZE's maximum. 32 MiB is what qemu and nbdkit use
	// and what clients assume when they are told nothing.
	MaxPayload = 32 << 20
	// MaxStreamed is the largest READ or WRITE served at all. Requests
	// above MaxPayload come from clients that negotiated no block size
	// (NBD_OPT_EXPORT_NAME) and assume nbdkit's 64 MiB; they are streamed
	// in streamChunk parts, never buffered whole.
	MaxStreamed = 64 << 20
	streamChunk = 4 << 20
	// maxOptionLen caps option data we read into memory; longer options
	// are skipped (read and discarded) and refused with ERR_TOO_BIG.
	maxOptionLen = 64 << 10
	// preferredBlock is NBD_INFO_BLOCK_SIZE's preferred size.
	preferredBlock = 4096
)

// Request is one transmission-phase request as decoded from the wire.
type Request = nbdwire.Request

// ErrBadMagic means a request did not start with a request magic: the
// stream is out of frame and the connection must be dropped. Errors
// carrying it also match ErrProtocol.
var ErrBadMagic = nbdwire.ErrBadMagic

// ErrProtocol is the class of every violation by a peer that ends its
// connection.
var ErrProtocol = errors.New("nbd: protocol violation")

// ParseRequest decodes a request header from b (nbdwire.ParseRequest),
// its errors of class ErrProtocol as well.
func ParseRequest(b []byte, ext bool) (Request, error) {
	r, err := nbdwire.ParseRequest(b, ext)
	if err != nil {
		err = protocolError(err)
	}
	return r, err
}

func protocolError(err error) error { return fmt.Errorf("%w: %w", ErrProtocol, err) }
