package reconciler

import (
	"context"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// watchFile reports changes to the file at path on the returned channel,
// at most one per debounce interval. It watches the file's directory, not
// the file, so an editor's write-to-temp-and-rename is seen as it is meant:
// a new version of the file. Closing happens when ctx is done.
func watchFile(ctx context.Context, path string, debounce time.Duration) (<-chan struct{}, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, err
	}
	dir, name := filepath.Dir(path), filepath.Base(path)
	const mask = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_CREATE | unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_ATTRIB
	if _, err := unix.InotifyAddWatch(fd, dir, mask); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// A non-blocking descriptor goes through the runtime's poller, so
	// Close wakes a pending Read.
	f := os.NewFile(uintptr(fd), "inotify")
	out := make(chan struct{}, 1)
	raw := make(chan struct{}, 1)
	go func() {
		<-ctx.Done()
		f.Close()
	}()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				close(raw)
				return
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				nameBytes := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
				off += unix.SizeofInotifyEvent + int(ev.Len)
				if cstring(nameBytes) == name {
					select {
					case raw <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	go func() {
		defer close(out)
		for {
			if _, ok := <-raw; !ok {
				return
			}
			// Let a burst of writes settle before reading the file.
			timer := time.NewTimer(debounce)
		settle:
			for {
				select {
				case _, ok := <-raw:
					if !ok {
						timer.Stop()
						return
					}
					timer.Reset(debounce)
				case <-timer.C:
					break settle
				}
			}
			select {
			case out <- struct{}{}:
			default:
			}
		}
	}()
	return out, nil
}

func cstring(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}
