"""ROS 2 interoperability without a ROS install: message mapping (`messages`), rosbag2 export
and import (`rosbag2`), the live DDS bridge (`dds`). Needs the `[ros2]` extra."""
